"""`qsft-data` (also `python launch/data.py`): inspect and convert SFT data, offline.

    qsft-data inspect FILE... [--tokenizer DIR] [--max_seq_length N] [--prompt_format F]
                      [--histogram PNG] [--strict]
    qsft-data convert SRC... --out DIR [--test_fraction F] [--overwrite]

Exit status: 0 ok; 1 `inspect --strict` found duplicates or train/test overlap; 2 bad input
(one line on stderr naming the file and line, row or column; nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.config import ASSETS_DIR, ConfigError
from trainer.records import DataError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qsft-data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="counts, token lengths, duplicates, train/test overlap")
    ins.add_argument("files", nargs="+", type=Path, help="JSONL / parquet / saved HF dataset")
    ins.add_argument(
        "--tokenizer",
        type=Path,
        default=ASSETS_DIR / "tiny_model",
        help="tokenizer dir to measure lengths with (default: the demo model's)",
    )
    ins.add_argument(
        "--max_seq_length",
        type=int,
        default=4096,
        help="count records longer than this (default 4096, the 1.5b-32b default)",
    )
    ins.add_argument(
        "--prompt_format",
        choices=("auto", "raw", "chat"),
        default="auto",
        help="format to measure lengths in, as train.py's flag (default auto)",
    )
    ins.add_argument(
        "--histogram",
        default=None,
        help="write a length histogram PNG here (default: none is drawn)",
    )
    ins.add_argument(
        "--strict", action="store_true", help="exit 1 on duplicate records or train/test overlap"
    )
    conv = sub.add_parser("convert", help="original problem dirs or parquet -> our JSONL")
    conv.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="problem directory tree, or parquet files / a directory of them",
    )
    conv.add_argument("--out", type=Path, required=True, help="directory for <split>.jsonl")
    conv.add_argument(
        "--test_fraction",
        type=float,
        default=0.0,
        help="problem dirs without train/ and test/ parents: hold out this share "
        "of problems (by a hash of the name: stable across runs)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace existing <split>.jsonl")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never the hub
    try:
        if args.command == "inspect":
            return _inspect(args)
        return _convert(args)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    from trainer.datatools.inspection import check_histogram_path, inspect_files
    from trainer.model import load_tokenizer

    if args.max_seq_length < 1:
        raise ConfigError(f"--max_seq_length {args.max_seq_length} must be positive")
    for f in args.files:
        if not f.exists():
            raise DataError(f"{f}: file not found")
    # 'none' was the way to skip it when a histogram was drawn by default; still accepted.
    histogram = None if args.histogram in (None, "none") else Path(args.histogram)
    if histogram is not None:
        check_histogram_path(histogram)
    tokenizer = load_tokenizer(args.tokenizer)
    lines, suspicious = inspect_files(
        args.files, tokenizer, args.max_seq_length, histogram, args.prompt_format
    )
    print("\n".join(lines))
    return 1 if suspicious and args.strict else 0


def _convert(args: argparse.Namespace) -> int:
    from trainer.datatools.convert import convert

    if not 0 <= args.test_fraction < 1:
        raise ConfigError(f"--test_fraction {args.test_fraction} must be in [0, 1)")
    written = convert(args.sources, args.out, args.test_fraction, args.overwrite)
    for name, n in written.items():
        print(f"{args.out / name}: {n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
