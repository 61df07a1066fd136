"""qsft-eval: does the model write working code? pass@k per task kind, per checkpoint.

    qsft-eval --model RUN/checkpoints/checkpoint-N/consolidated --eval_file test.jsonl \
        --output_dir D
    qsft-eval --checkpoints RUN --eval_file test.jsonl --output_dir D   # every consolidated one
    qsft-eval --predictions preds.jsonl --eval_file test.jsonl --output_dir D   # no model

Writes D/eval_generation.json (pass@k, the "parses" rate of q answers that could only be linted,
counts, settings, isolation, versions) and D/samples.jsonl (one line per sample: prompt id,
completion, verdict, error). With --checkpoints, one such pair per checkpoint under
D/checkpoint-N/, a table of eval loss beside pass@k, and RUN/best_checkpoint.json naming the
best by pass@1 for the RL stage. Exit 0, or 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainer import versions
from trainer.checkpoint.layout import CONSOLIDATED, checkpoint_root, step_of
from trainer.config import ASSETS_DIR, OneLineParser
from trainer.evaluation import generate, sandbox
from trainer.evaluation.scoring import LANG, Scorer, load_problems, summarize
from trainer.records import DataError, is_messages, load_records


class EvalError(ValueError):
    """Bad input: one line naming the file, line or flag."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="qsft-eval", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a consolidated checkpoint (or any HF model dir)")
    src.add_argument("--checkpoints", type=Path, help="a run's OUTPUT_DIR: every consolidated")
    src.add_argument("--predictions", type=Path, help="JSONL of {id, completion}: no model")
    p.add_argument("--eval_file", type=Path, required=True, help="records with problem_id, task")
    p.add_argument(
        "--problems", type=Path, default=ASSETS_DIR / "q_problems.jsonl", help="the tests"
    )
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--samples", type=int, default=1, help="completions per prompt (n)")
    p.add_argument("--k", default="1", help="comma-separated k of pass@k (each <= --samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (one sample)")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--limit", type=int, help="only the first N eval records")
    p.add_argument("--prompt_format", choices=("raw", "chat"), help="for a non-qsft model dir")
    p.add_argument(
        "--q_binary", help="a q interpreter (default: q on PATH); 'none': q answers are linted"
    )
    p.add_argument("--timeout_s", type=float, default=2.0, help="wall clock per answer")
    p.add_argument("--memory_mb", type=int, default=1024, help="address space per answer")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        # pass@1 always: the best checkpoint is chosen by it.
        args.ks = sorted({1} | {int(k) for k in args.k.split(",")})
    except ValueError:
        raise EvalError(f"--k {args.k!r}: expected comma-separated integers, e.g. 1,5") from None
    if min(args.ks) < 1 or (not args.predictions and max(args.ks) > args.samples):
        raise EvalError(f"--k {args.k}: every k must be between 1 and --samples {args.samples}")
    if args.samples > 1 and args.temperature <= 0 and not args.predictions:
        raise EvalError(f"--samples {args.samples} needs --temperature > 0 (greedy repeats)")
    for flag, value, low in (
        ("--samples", args.samples, 1),
        ("--max_new_tokens", args.max_new_tokens, 1),
        ("--batch_size", args.batch_size, 1),
        ("--timeout_s", args.timeout_s, 0.1),
        ("--memory_mb", args.memory_mb, 64),
        ("--limit", args.limit if args.limit is not None else 1, 1),
    ):
        if value < low:
            raise EvalError(f"{flag} {value}: must be at least {low}")
    return args


def load_eval(path: Path, problems: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    records = load_records(path)
    out, seen = [], set()
    for i, rec in enumerate(records[:limit] if limit else records):
        where = records.where(i)
        if rec.get("task") not in LANG or "problem_id" not in rec or "id" not in rec:
            raise EvalError(f"{where}: needs id, problem_id and task ({', '.join(LANG)})")
        if rec["problem_id"] not in problems:
            raise EvalError(f"{where}: problem {rec['problem_id']!r} is not in the problem table")
        if rec["id"] in seen:
            raise EvalError(f"{where}: id {rec['id']!r} appears twice")
        seen.add(rec["id"])
        out.append(rec)
    return out


def read_predictions(path: Path, ids: set[str], ks: list[int]) -> dict[str, list[str]]:
    preds: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid, completion = rec["id"], rec["completion"]
        except (ValueError, KeyError, TypeError):
            raise EvalError(f'{path}:{n}: expected {{"id": ..., "completion": ...}}') from None
        if rid not in ids:
            raise EvalError(f"{path}:{n}: id {rid!r} is not in --eval_file")
        preds.setdefault(rid, []).append(str(completion))
    missing = sorted(ids - set(preds))
    if missing:
        raise EvalError(f"{path}: no prediction for {len(missing)} eval records, e.g. {missing[0]}")
    fewest = min(len(v) for v in preds.values())
    if max(ks) > fewest:
        rid = next(k for k, v in preds.items() if len(v) == fewest)
        raise EvalError(f"{path}: {rid} has {fewest} completion(s), fewer than --k {max(ks)}")
    return preds


def completions_from_model(
    model_dir: Path, records: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    from transformers import AutoTokenizer

    fmt, ends = generate.read_format(model_dir, args.prompt_format)
    if fmt == "raw" and any(is_messages(r) for r in records):
        raise EvalError(
            f"{model_dir}: trained in the raw format, but --eval_file has messages "
            f"records (raw takes prompt/completion records)"
        )
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [generate.prompt_text(r, tok, fmt) for r in records]
    stops = generate.stop_ids(model_dir, ends, tok)
    t0 = time.perf_counter()
    texts, engine = generate.generate(
        model_dir,
        prompts,
        generate.Sampling(args.samples, args.temperature, args.max_new_tokens, args.seed, stops),
        fmt,
        args.batch_size,
    )
    info = dict(
        model=str(model_dir),
        prompt_format=fmt,
        stop_token_ids=stops,
        engine=engine,
        generate_s=round(time.perf_counter() - t0, 2),
    )
    return {r["id"]: t for r, t in zip(records, texts, strict=True)}, info


def evaluate(
    completions: dict[str, list[str]],
    records: list[dict[str, Any]],
    problems: dict[str, Any],
    scorer: Scorer,
    args: argparse.Namespace,
    out_dir: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Score every sample, write samples.jsonl and eval_generation.json; returns the latter."""
    rows = []
    # q answers that can only be linted go to qls together: one server for all of them.
    lintable = {}
    if not scorer.q_binary:
        from trainer.evaluation.scoring import extract_code

        lintable = {
            f"{r['id']}#{j}": extract_code(c, "q")
            for r in records
            if LANG[r["task"]] == "q"
            for j, c in enumerate(completions[r["id"]])
        }
        lint_found = scorer.lint_many({k: v for k, v in lintable.items() if v})
    for r in records:
        for j, completion in enumerate(completions[r["id"]]):
            key = f"{r['id']}#{j}"
            if key in lintable:
                problems_found = lint_found.get(key, ["empty answer"])
                verdict = dict(
                    passed=not problems_found, how="linted", detail="; ".join(problems_found[:3])
                )
            else:
                v = scorer.score(r["task"], completion, problems[r["problem_id"]])
                verdict = dict(passed=v.passed, how=v.how, detail=v.detail)
            rows.append(
                dict(
                    id=r["id"],
                    problem_id=r["problem_id"],
                    task=r["task"],
                    sample=j,
                    completion=completion,
                    **verdict,
                )
            )
    summary = summarize(rows, args.ks)
    report = dict(
        **summary,
        tasks_executed="q2py always; desc2q/py2q with a q binary, else linted (parses)",
        q_binary=scorer.q_binary,
        isolation=scorer.isolation,
        limits=dict(wall_s=args.timeout_s, memory_mb=args.memory_mb),
        settings=dict(
            samples_per_prompt=sorted({len(v) for v in completions.values()}),
            k=args.ks,
            batch_size=args.batch_size,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            eval_file=str(args.eval_file),
            problems=str(args.problems),
        ),
        versions=versions(),
        **extra,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
    _write(out_dir / "eval_generation.json", json.dumps(report, indent=2) + "\n")
    return report


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe(report: dict[str, Any]) -> str:
    parts = [
        f"{task} {k} {v:.3f}" for task, ks in report["pass_at_k"].items() for k, v in ks.items()
    ]
    parts += [f"{task} parses {v:.3f} (linted)" for task, v in report["parses"].items()]
    return "; ".join(parts) or "nothing scored"


def headline(report: dict[str, Any]) -> tuple[str, float | None]:
    """The number a checkpoint is chosen by: pass@1 over the executed prompts, else (no q
    interpreter, q-only data) the linted parses rate, said as such."""
    p1 = report["pass_at_k"].get("overall", {}).get("pass@1")
    if p1 is not None:
        return "pass@1 (executed)", p1
    parses = report["parses"].get("overall")
    return ("parses (linted only)", parses) if parses is not None else ("none", None)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = [
        (step_of(p.name), p / CONSOLIDATED)
        for p in checkpoint_root(run_dir).glob("checkpoint-*")
        if (p / CONSOLIDATED / "config.json").is_file()
    ]
    return sorted(x for x in found if x[0] >= 0)


def eval_losses(run_dir: Path) -> dict[int, float]:
    try:
        history = json.loads((run_dir / "logs" / "eval_results.json").read_text())["history"]
        return {int(r["step"]): float(r["eval_loss"]) for r in history}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _loss(row: dict[str, Any]) -> float:
    """Eval loss for ranking: a checkpoint without one never wins a tie."""
    return row["eval_loss"] if row["eval_loss"] is not None else float("inf")


def prepare_scorer(args: argparse.Namespace, records, problems) -> Scorer:
    """The scorer, checked before any generation: qls present when q answers will be linted,
    and a reference solution passes (a wrong answer fails) through the sandbox."""
    scorer = Scorer(
        sandbox.Limits(
            wall_s=args.timeout_s, cpu_s=int(args.timeout_s) + 2, memory_mb=args.memory_mb
        ),
        args.q_binary,
    )
    if not scorer.q_binary and any(LANG[r["task"]] == "q" for r in records):
        from trainer.datatools.qlint import QlsNotFound, find_qls

        try:
            find_qls()
        except QlsNotFound as e:
            raise EvalError(f"{e}; or give --q_binary to run q answers") from None
    checkable = [p for p in problems.values() if p.get("python") and p.get("q")]
    if checkable:
        scorer.self_check(problems.get(records[0]["problem_id"], checkable[0]))
    return scorer


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        problems = load_problems(args.problems)
        records = load_eval(args.eval_file, problems, args.limit)
        if not records:
            raise EvalError(f"{args.eval_file}: no records")
        scorer = prepare_scorer(args, records, problems)
        if args.predictions:
            preds = read_predictions(args.predictions, {r["id"] for r in records}, args.ks)
            report = evaluate(
                preds,
                records,
                problems,
                scorer,
                args,
                args.output_dir,
                dict(predictions=str(args.predictions)),
            )
            print(f"{args.predictions}: {describe(report)}")
            return 0
        if args.model:
            preds, info = completions_from_model(args.model, records, args)
            report = evaluate(preds, records, problems, scorer, args, args.output_dir, info)
            print(f"{args.model}: {describe(report)}")
            return 0
        return eval_run(args, records, problems, scorer)
    except (EvalError, DataError, ValueError, generate.FormatError, OSError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
        print(f"qsft-eval: error: {msg}", file=sys.stderr)
        return 2


def eval_run(args: argparse.Namespace, records, problems, scorer: Scorer) -> int:
    """--checkpoints: every consolidated checkpoint, a table, and best_checkpoint.json."""
    found = checkpoints(args.checkpoints)
    if not found:
        raise EvalError(f"--checkpoints {args.checkpoints}: no checkpoint-N/consolidated/ there")
    losses = eval_losses(args.checkpoints)
    table = []
    for step, model_dir in found:
        preds, info = completions_from_model(model_dir, records, args)
        out = args.output_dir / f"checkpoint-{step}"
        report = evaluate(preds, records, problems, scorer, args, out, info)
        criterion, value = headline(report)
        table.append(
            dict(
                step=step,
                path=str(model_dir),
                eval_loss=losses.get(step),
                criterion=criterion,
                value=value,
                report=str(out / "eval_generation.json"),
                summary=describe(report),
            )
        )
    print(f"{'step':>8}  {'eval loss':>9}  pass@k / parses")
    for row in table:
        loss = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        print(f"{row['step']:>8}  {loss:>9}  {row['summary']}")
    scored = [r for r in table if r["value"] is not None]
    if not scored:
        raise EvalError("no checkpoint could be scored")
    # Highest pass@1; ties go to the lower eval loss, then the earlier step.
    best = max(scored, key=lambda r: (r["value"], -_loss(r), -r["step"]))
    choice = dict(
        path=best["path"],
        step=best["step"],
        criterion=best["criterion"],
        value=best["value"],
        eval_loss=best["eval_loss"],
        eval_generation=best["report"],
        candidates=[{k: r[k] for k in ("step", "value", "eval_loss")} for r in table],
        chosen_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _write(args.checkpoints / "best_checkpoint.json", json.dumps(choice, indent=2) + "\n")
    print(
        f"best by {best['criterion']}: checkpoint-{best['step']} ({best['value']:.3f}) -> "
        f"{args.checkpoints / 'best_checkpoint.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
