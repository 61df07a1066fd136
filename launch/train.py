"""Entry point: `deepspeed [--num_gpus N | --hostfile H] launch/train.py --model_size ... `.

Parses and validates the run, trains, and always tears the process group down. Bad input exits
with status 2 and one line on stderr (printed by rank 0 only, so a 64-rank job prints it once).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from trainer import dist  # noqa: E402
from trainer.config import ConfigError, parse_run_config  # noqa: E402
from trainer.data import DataError  # noqa: E402

# DeepSpeed 0.19.8 still calls torch.distributed's *_into_tensor / *_tensor collectives, which
# torch 2.13 deprecates with a FutureWarning per call site and rank; the calls work.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_run_config(sys.argv[1:] if argv is None else argv)
        from trainer.loop import train

        train(cfg)
        return 0
    except (ConfigError, DataError) as e:
        if dist.env_rank() == 0:
            print(f"qsft: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A collective that failed because another rank died: let the watchdog name that rank
        # (it prints one line and exits 1); otherwise this rank's own error propagates.
        from trainer import watchdog

        if watchdog.is_comm_error(e):
            watchdog.wait_for_culprit()
        raise
    finally:
        from trainer import watchdog

        watchdog.stop()
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
