"""Entry point: `python launch/consolidate.py CHECKPOINTS_ROOT_OR_TAG_DIR [...]`.

The same as `python -m trainer.offline.consolidate` and the `qsft-consolidate` console script.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from trainer.offline.consolidate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
