"""Entry point: `python launch/eval.py --model DIR --eval_file F --output_dir D` — pass@k.

The same as `python -m trainer.evaluation.cli` and the `qsft-eval` console script.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from trainer.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
