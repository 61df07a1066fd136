"""Entry point: `deepspeed [--num_gpus N | --hostfile H] launch/train.py --model_size ... `.

Parses and validates the run, trains, and always tears the process group down. Bad input exits
with status 2 and one line on stderr (printed by rank 0 only, so a 64-rank job prints it once);
a run that cannot go on (disk full, non-finite loss, damaged checkpoint) exits with status 1 and
one line (trainer.faults.RunError).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from trainer import dist  # noqa: E402
from trainer.config import ConfigError, parse_run_config  # noqa: E402
from trainer.faults import RunError  # noqa: E402
from trainer.records import DataError  # noqa: E402

# DeepSpeed 0.19.8 still calls torch.distributed's *_into_tensor / *_tensor collectives, which
# torch 2.13 deprecates with a FutureWarning per call site and rank; the calls work.
warnings.filterwarnings(
    "ignore", category=FutureWarning, message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*"
)


def main(argv: list[str] | None = None) -> int:
    from trainer import watchdog

    try:
        cfg = _parse(sys.argv[1:] if argv is None else argv)
        from trainer.loop import train

        train(cfg)
        return 0
    except (ConfigError, DataError) as e:
        watchdog.fail(e)  # only if it was running: a rank-local error after the preflight
        if dist.env_rank() == 0:
            print(f"qsft: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        # Raised by every rank at the same point: leaving is not a failure the others must be
        # told about (that could race rank 0's own one line); a rank-local one is.
        watchdog.stop() if e.everywhere else watchdog.fail(e)
        if dist.env_rank() == 0 or not e.everywhere:
            print(f"qsft: error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        # A collective that failed because another rank died: let the watchdog name that rank
        # (it prints one line and exits 1). Otherwise this rank's own error: tell the other
        # ranks at once (they stop naming this rank), then propagate it.
        if watchdog.is_comm_error(e):
            watchdog.wait_for_culprit()
        watchdog.fail(e)
        raise
    finally:
        watchdog.stop()
        dist.teardown()


def _parse(argv: list[str]):
    """The run config; a flag that fails on some ranks only (a path one node lacks) fails all.

    Every rank parses on its own. Where the launcher started several, a rank whose parse failed
    joins the process group and the preflight's error gathering (trainer.startup.setup runs the
    same collective on the ranks that parsed), so the whole job stops with one line naming the
    rank, instead of the others waiting at the rendezvous.
    """
    try:
        return parse_run_config(argv)
    except ConfigError as e:
        if dist.env_world_size() > 1:
            from trainer import preflight

            dist.init(1800)
            preflight.gather_errors(e)
        raise


if __name__ == "__main__":
    sys.exit(main())
