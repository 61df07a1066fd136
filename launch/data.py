"""Entry point: `python launch/data.py inspect|convert ...` — look at or convert SFT data.

The same as `python -m trainer.datatools.cli` and the `qsft-data` console script; offline.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from trainer.datatools.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
