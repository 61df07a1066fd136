"""Entry point: `python launch/plan.py --model_size 32b [...]` — will the run fit in memory?

The same as `python -m trainer.offline.plan_cli` and the `qsft-plan` console script. No GPU, no
weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from trainer.offline.plan_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
