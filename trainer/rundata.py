"""The run's data: its files tokenized through the cache, the training mix, what is said of it.

Called by every rank of trainer.startup.setup after the process group exists.

Who builds the cache (trainer.datacache): one rank per node (local rank 0) while the node's other
ranks wait in a barrier of their own, with --data_timeout_s (tokenizing a large set takes longer
than the collective timeout); when every node sees the same cache directory (a shared
filesystem, checked with probe files), global rank 0 alone. The builder's outcome (the entries,
or the one-line error) then reaches every rank, so bad data stops the whole job with one
message, exit 2. The prompt format is decided by the training files
(--prompt_format auto) and applies to the eval files too; so does --overlong.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from trainer import datacache, dist, preflight
from trainer.config import RunConfig
from trainer.records import DataError
from trainer.tokenized import TokenizedSet, mix


@dataclass
class RunData:
    train: TokenizedSet  # the training files as one set (a mix when several)
    train_files: list[TokenizedSet]
    evals: list[TokenizedSet]  # one per --eval_file, in order
    report: dict[str, Any] = field(default_factory=dict)  # the cache builder's

    @property
    def train_hash(self) -> str:
        return self.report["train_hash"]


def load(cfg: RunConfig, tokenizer: Any) -> RunData:
    """Collective: every file tokenized once (cached) and memory-mapped on this rank."""

    def say(text: str) -> None:  # the builder, before any log exists: one line, at once
        print(f"qsft: {text}", file=sys.stderr, flush=True)

    train, evals, report = prepare(
        cfg.train_paths,
        cfg.eval_paths,
        tokenizer,
        cfg.model_dir,
        cfg.prompt_format,
        cfg.max_seq_length,
        cfg.overlong,
        cfg.cache_dir,
        cfg.num_proc or datacache.default_num_proc(),
        cfg.data_timeout_s,
        say,
    )
    return RunData(mix(train, cfg.train_weights), train, evals, report)


def prepare(
    train: list[Path],
    evals: list[Path],
    tokenizer: Any,
    model_dir: Path,
    requested_format: str,
    max_seq_length: int,
    overlong: str,
    cache_dir: Path,
    num_proc: int,
    timeout_s: int,
    say: Any = print,
) -> tuple[list[TokenizedSet], list[TokenizedSet], dict[str, Any]]:
    """Collective: every file tokenized (once per node, or once) and mapped on every rank.

    Returns the train sets, the eval sets (in the order given) and the builder's report.
    """
    import torch.distributed as tdist

    # One build for all when every rank sees rank 0's files there (a shared filesystem).
    shared = dist.world_size() == 1 or all(0 in s for s in preflight.visible_ranks(cache_dir)[0])
    # The launchers (deepspeed, torchrun) number each node's ranks contiguously: the node's
    # local rank 0 is this rank minus its local rank.
    builder_rank = 0 if shared else dist.rank() - int(os.environ.get("LOCAL_RANK", "0"))
    result: dict[str, Any] | None = None
    crash: BaseException | None = None
    if dist.rank() == builder_rank:
        try:
            result = datacache.ensure_entries(
                train,
                evals,
                tokenizer,
                model_dir,
                requested_format,
                max_seq_length,
                overlong,
                cache_dir,
                num_proc,
                say,
            )
        except DataError as e:
            result = {"error": str(e)}
        except OSError as e:
            result = {"error": f"--data_cache_dir {cache_dir}: {e.strerror or e}"}
        except Exception as e:  # noqa: BLE001 - a bug: the waiting ranks must not wait for hours
            crash, result = (
                e,
                {
                    "error": f"rank {dist.rank()} failed while tokenizing: {type(e).__name__}: {e}",
                    "crash": True,
                },
            )
    if dist.is_initialized() and dist.world_size() > 1:
        # Gloo, whatever the training backend: a CPU wait with its own, long timeout.
        group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        tdist.barrier(group=group)
        tdist.destroy_process_group(group)
    results = dist.gather_objects(result)
    if crash is not None:
        raise crash
    failed = [r for r in results if r is not None and "error" in r]
    if failed:
        if failed[0].get("crash"):
            raise RuntimeError(failed[0]["error"])
        raise DataError(failed[0]["error"])
    built = [r for r in results if r is not None]
    if len({r["train_hash"] for r in built}) > 1:  # node-local caches: each node its own copy
        raise DataError(
            "the nodes' training files differ (their contents hash differently): "
            "every node must train on the same data"
        )
    mine = results[builder_rank]
    entries = mine["entries"]
    load = {}
    for p in dict.fromkeys([*map(str, train), *map(str, evals)]):
        load[p] = datacache.load_entry(Path(entries[p]["dir"]), p, max_seq_length)
    return ([load[str(p)] for p in train], [load[str(p)] for p in evals], mine)


def check_files(cfg: RunConfig) -> None:
    """Every rank, before the process group: a data path this rank cannot see is its error
    (gathered by the preflight, naming the rank), not a wait for a builder elsewhere."""
    for p in [*cfg.train_paths, *cfg.eval_paths]:
        if not Path(p).exists():
            raise DataError(f"{p}: file not found")


def steps_for_epochs(num_epochs: float, units_per_epoch: int, global_batch: int) -> int:
    """Optimizer steps for --num_epochs (packed epochs differ by a few sequences: the first
    epoch's count stands for all)."""
    return max(1, math.ceil(num_epochs * units_per_epoch / global_batch - 1e-9))


def describe(name: str, data: TokenizedSet, cfg: RunConfig) -> list[str]:
    """Start-message lines for one file: what was kept, dropped, cut; boundary merges."""
    st = data.stats
    lines = [
        f"{name} {data.source}: {st['records']} records -> {st['examples']} examples, "
        f"{st['tokens']} tokens ({st['label_tokens']} trained)"
    ]
    if st["dropped"] or st["truncated"]:
        what = (
            f"{st['dropped']} dropped"
            if cfg.overlong == "drop"
            else f"{st['truncated']} cut to {cfg.max_seq_length} tokens"
            + (f", {st['dropped']} dropped (nothing left to train)" if st["dropped"] else "")
        )
        lines.append(
            f"{name}: {st['dropped'] + st['truncated']} of {st['records']} records are "
            f"longer than --max_seq_length {cfg.max_seq_length}: {what} "
            f"(--overlong {cfg.overlong})"
            + ("; the eval loss leaves them out" if name == "eval" and st["dropped"] else "")
        )
    if st.get("boundary_merged"):
        lines.append(
            f"warning: {name}: in {st['boundary_merged']} of {st['examples']} records "
            f"the prompt's last token merges with the completion's first (raw format, "
            f"as TRL's SFTTrainer): the model trains on a prompt ending that inference "
            f"never produces; end the prompts on a token boundary, e.g. a newline"
        )
    return lines


def describe_all(data: RunData, cfg: RunConfig, sampler: Any) -> list[str]:
    lines = []
    for k, s in enumerate(data.train_files):
        lines += describe("train", s, cfg)
        if sampler.quotas is not None:
            q, n = sampler.quotas[k], len(s)
            lines.append(
                f"train mix: {s.source} weight {cfg.train_weights[k]:g} -> {q} of each "
                f"epoch's {sum(sampler.quotas)} examples ({q / n:.2f}x its {n})"
            )
    for s in data.evals:
        lines += describe("eval", s, cfg)
    for entry in data.report["entries"].values():
        how = f"tokenized in {entry['seconds']:.1f}s" if entry["built"] else "tokenized earlier"
        lines.append(f"data cache {entry['dir']}: {Path(entry['path']).name} {how}")
    return lines


def config_section(data: RunData, cfg: RunConfig, sampler: Any) -> dict[str, Any]:
    """config.yaml's data: per-file counts, the mix, the cache entries."""
    files = []
    for k, s in enumerate(data.train_files):
        item = dict(path=s.source, **s.stats)
        if sampler.quotas is not None:
            item.update(weight=cfg.train_weights[k], per_epoch=sampler.quotas[k])
        files.append(item)
    out: dict[str, Any] = dict(train=files[0] if len(files) == 1 else files)
    if len(files) > 1:
        out["train_total"] = dict(data.train.stats)
    if data.evals:
        evals = [dict(path=s.source, **s.stats) for s in data.evals]
        out["eval"] = evals[0] if len(evals) == 1 else evals
    out["cache"] = {Path(e["path"]).name: e["dir"] for e in data.report["entries"].values()}
    return out
