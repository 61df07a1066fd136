"""Logging sinks: training_log.txt, metrics.jsonl, eval_results.json, curves.png, wandb, the
progress bar; and what a run writes about itself: config.yaml and the summary.

Rank 0 gets a :class:`MetricsSink`; the other ranks get a :class:`NullSink` with the same methods,
so the loop never branches on the rank to log (nanochat's DummyWandb pattern).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainer import plots, versions


class NullSink:
    """What non-zero ranks log to: nothing."""

    wandb_run_id: str | None = None
    eval_data: dict[str, Any] | None = None  # the eval set's counts, kept and dropped

    def log_step(self, record: dict[str, Any]) -> None: ...
    def log_eval(self, history: list[dict[str, Any]]) -> None: ...
    def log_event(self, record: dict[str, Any]) -> None: ...
    def write_summary(self, summary: dict[str, Any]) -> None: ...
    def log_samples(self, step: int, sample_ids: list[int]) -> None: ...
    def message(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...
    def progress(self, step: int, postfix: dict[str, Any]) -> None: ...
    def end_progress(self) -> None: ...
    def close(self) -> None: ...


class MetricsSink(NullSink):
    """Rank 0's sink. Files are appended so a resumed run continues its logs."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, wandb_cfg: Any = None):
        self.logs = Path(output_dir) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.text = open(self.logs / "training_log.txt", "a", buffering=1)
        self.jsonl = open(self.logs / "metrics.jsonl", "a", buffering=1)
        # Which examples (source indices) each optimizer step trained on: an audit trail, and
        # how the resume tests prove that no example is skipped or repeated.
        self.samples = open(self.logs / "data_order.jsonl", "a", buffering=1)
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,  # the stream messages go to (see message())
            disable=os.environ.get("QSFT_NO_PROGRESS") == "1",
        )
        self.wandb = _start_wandb(wandb_cfg, self.message) if wandb_cfg else None
        self.wandb_run_id = self.wandb.id if self.wandb else None
        self.curves_failed = False

    def log_step(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.text.write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {record['step']} "
            f"loss {record['loss']:.4f} lr {record['lr']:.3e} grad_norm {record['grad_norm']:.3f} "
            f"tokens/s {record['tokens_per_s']:.0f} mfu {record.get('mfu', 0):.1%} "
            f"padding {record.get('padding', 0):.1%} units {record['consumed_units']}\n"
        )
        if self.wandb:
            self.wandb.log(
                {f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"]
            )

    def write_summary(self, summary: dict[str, Any]) -> None:
        """logs/summary.json, after drawing the final curves.png (named in the summary)."""
        curves = self.draw_curves(summary["eval"])
        summary["curves"] = str(curves) if curves else None
        (self.logs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def draw_curves(self, eval_history: list[dict[str, Any]]) -> Path | None:
        """Redraw logs/curves.png from metrics.jsonl. A picture that cannot be drawn (no
        matplotlib, a full disk) is said once and never stops training: the numbers it shows
        are in metrics.jsonl and eval_results.json."""
        if self.curves_failed:
            return None
        try:
            return plots.draw_curves(self.logs, eval_history)
        except Exception as e:  # noqa: BLE001 - any plotting failure, matplotlib's included
            self.curves_failed = True
            self.message(
                f"warning: {self.logs / plots.CURVES} not drawn ({type(e).__name__}: {e}); "
                f"the figures are in metrics.jsonl and eval_results.json"
            )
            return None

    def log_event(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")

    def log_samples(self, step: int, sample_ids: list[int]) -> None:
        self.samples.write(json.dumps({"step": step, "samples": sample_ids}) + "\n")

    def log_eval(self, history: list[dict[str, Any]]) -> None:
        last, best = history[-1], min(history, key=lambda r: r["eval_loss"])
        tmp = self.logs / "eval_results.json.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "history": history,
                    "best_step": best["step"],
                    "best_eval_loss": best["eval_loss"],
                    "eval_data": self.eval_data,
                },
                indent=2,
            )
            + "\n"
        )
        os.replace(tmp, self.logs / "eval_results.json")
        self.draw_curves(history)
        self.message(
            f"eval step {last['step']}: loss {last['eval_loss']:.4f} perplexity "
            f"{last['perplexity']:.2f} (best {best['eval_loss']:.4f} at step "
            f"{best['step']})"
            + "".join(
                f"; {name} {loss:.4f}" for name, loss in last.get("eval_loss_by_file", {}).items()
            )
        )
        if self.wandb:
            per_file = {
                f"eval/loss/{name}": loss
                for name, loss in last.get("eval_loss_by_file", {}).items()
            }
            self.wandb.log(
                {"eval/loss": last["eval_loss"], "eval/perplexity": last["perplexity"], **per_file},
                step=last["step"],
            )

    def message(self, text: str) -> None:
        """A line for the person watching: above the progress bar, and in training_log.txt.

        The bar redraws its line with a carriage return. tqdm.write() prints to stdout while a
        default bar draws on stderr, and stdout under a launcher is a pipe whose buffer is
        written later: the message then lands on (or after) the bar's line. So the bar and the
        messages share stdout, and each message clears the bar, is written and flushed, and the
        bar is drawn again below it.
        """
        if self.bar.disable:
            print(text, flush=True)
        else:
            with self.bar.external_write_mode(file=self.bar.fp):
                self.bar.fp.write(text + "\n")
                self.bar.fp.flush()
        self.note(text)

    def note(self, text: str) -> None:
        """To training_log.txt only (what the terminal already shows another way)."""
        self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        self.bar.n = step
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def end_progress(self) -> None:
        """Close the bar for good: what is printed after it (the summary) stays below it."""
        self.bar.close()  # tqdm sets disable: message() then prints plain lines

    def close(self) -> None:
        self.bar.close()
        self.text.close()
        self.jsonl.close()
        self.samples.close()
        if self.wandb:
            self.wandb.finish()


def pooled_stats(sets: list[Any]) -> dict[str, Any] | None:
    """The eval files' counts added up (kept, dropped, cut), for the summary."""
    if not sets:
        return None
    return {k: sum(s.stats[k] for s in sets) for k in sets[0].stats}


def write_run_config(
    cfg: Any,
    ds_config: dict[str, Any],
    world: int,
    num_params: int,
    data: dict[str, Any],
    kernels: dict[str, Any],
) -> None:
    """OUTPUT_DIR/config.yaml: every setting as resolved, the DeepSpeed config as given to it,
    the data (format, files, mix), the kernels and the library versions."""
    import yaml

    resolved = dict(
        run=cfg.model_dump(mode="json"),
        deepspeed=ds_config,
        world_size=world,
        num_parameters=num_params,
        warmup_steps=cfg.resolved_warmup_steps,
        data=data,
        kernels=kernels,
        versions=versions(),
    )
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


def wandb_config(cfg: Any, ds_config: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """The wandb run to start (or resume, with the id a checkpoint recorded)."""
    wandb_dir = Path(cfg.output_dir) / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        project="qsft",
        name=f"{cfg.experiment_name}-{cfg.model_size}",
        config=dict(run=cfg.model_dump(mode="json"), deepspeed=ds_config),
        dir=str(wandb_dir),
        run_id=run_id,
    )


def format_summary(s: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    title = "stopped early (resume with --resume auto)" if s.get("stopped") else "training complete"
    lines = [
        "",
        f"== qsft: {title} ==",
        f"steps {s['steps']} in {s['wall_s'] / 60:.1f} min, mean {s['tokens_per_s']:.0f} "
        f"tokens/s (non-padding, all ranks)",
    ]
    if s["eval"]:
        first, last = s["eval"][0], s["eval"][-1]
        best = min(s["eval"], key=lambda r: r["eval_loss"])
        lines.append(
            f"eval loss {first['eval_loss']:.4f} (step {first['step']}) -> "
            f"{last['eval_loss']:.4f} (step {last['step']}); best "
            f"{best['eval_loss']:.4f} at step {best['step']}"
        )
        data = s.get("eval_data") or {}
        if data.get("dropped") or data.get("truncated"):
            lines.append(
                f"eval over {data['examples']} of {data['records']} records: "
                f"{data['dropped']} longer than --max_seq_length left out, "
                f"{data['truncated']} cut to it"
            )
    if s.get("best_checkpoint") and s["eval"]:
        best = min(s["eval"], key=lambda r: r["eval_loss"])
        lines.append(f"best checkpoint by eval loss (step {best['step']}): {s['best_checkpoint']}")
    if s.get("curves"):
        lines.append(f"curves (loss, eval loss, learning rate, tokens/s): {s['curves']}")
    c = s["consolidated"]
    if c:
        lines += [
            f"consolidated checkpoint: {c}",
            "load it: from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"AutoModelForCausalLM.from_pretrained('{c}'); "
            f"AutoTokenizer.from_pretrained('{c}')",
        ]
    return "\n".join(lines)


def _start_wandb(cfg: dict[str, Any], say: Any) -> Any:
    """Start (or resume) a wandb run that can never hang the job.

    No API key -> offline mode; a failed online start -> offline. Said once, on rank 0.
    """
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
        mode = "offline"
        say("wandb: no API key found; logging offline (upload later with `wandb sync`)")
    kwargs = dict(
        project=cfg["project"],
        name=cfg["name"],
        config=cfg["config"],
        dir=cfg["dir"],
        id=cfg.get("run_id"),
        resume="allow" if cfg.get("run_id") else None,
        settings=wandb.Settings(init_timeout=60, silent=True),
    )
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as e:  # wandb raises its own CommError/UsageError types on a bad network
        say(f"wandb: online start failed ({type(e).__name__}); logging offline instead")
        return wandb.init(mode="offline", **kwargs)


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
