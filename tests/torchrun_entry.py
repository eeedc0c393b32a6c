"""`run.py` for the distributed tests, optionally with one rank failing: with SURGEON_TEST_FAIL="RANK:SHOT" the
process of that rank raises in that shot (before its curvature pass), as a crashing GPU or a bug would, and with
"RANK:SHOT:hang" it hangs there instead (sleeps); the others run on into the shot's collectives. Launched as
`torchrun ... tests/torchrun_entry.py <overrides>`."""
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from surgeon import runner  # noqa: E402

fail = os.environ.get("SURGEON_TEST_FAIL")
if fail:
    fail_rank, fail_shot, *how = fail.split(":")
    fail_rank, fail_shot = int(fail_rank), int(fail_shot)
    prune_shot = runner.prune_shot

    def prune_shot_that_fails(model, layers, batches, state, target, opts, *, seed=0, progress=False):
        shot = seed - runner_seed
        if int(os.environ.get("RANK", "0")) == fail_rank and shot == fail_shot:
            if how == ["hang"]:
                time.sleep(3600)
            raise RuntimeError(f"injected failure of rank {fail_rank} in shot {fail_shot}")
        return prune_shot(model, layers, batches, state, target, opts, seed=seed, progress=progress)

    runner_seed = 0  # the runner seeds shot t with cfg.seed + t; the tests keep seed=0
    runner.prune_shot = prune_shot_that_fails

sys.argv[0] = str(ROOT / "run.py")
runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
