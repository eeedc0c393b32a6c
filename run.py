"""Entry point: `python run.py [overrides]` (Hydra). See README.md for the keys."""
import os

# torch's spin-waiting OpenMP threads can slow eigh/Cholesky by orders of magnitude on busy machines
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from surgeon.config import ConfigError, register_resolvers  # noqa: E402

register_resolvers()
log = logging.getLogger("surgeon")


def resume_command(run_dir: Path) -> str:
    """The command that continues this run from its last finished shot (with torchrun when it ran under it)."""
    keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    launcher = ["python"]
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}"]
    return shlex.join([*launcher, "run.py", *keep, "resume=true", f"hydra.run.dir={run_dir}"])


def _remove_fresh(run_dir: Path) -> None:
    """Delete the folder Hydra made for a run that never started (no record), and its parent if left empty."""
    if run_dir.is_dir() and not (run_dir / "record.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()


def _join_processes(cfg: DictConfig, run_dir: Path) -> Path:
    """Under torchrun or SLURM (WORLD_SIZE > 1): join the process group and use rank 0's run directory (each
    process's Hydra named its own after its start time); the other ranks log warnings only."""
    from surgeon import distributed
    from surgeon.config import resolve_device, validate

    if distributed.env_world_size() > 1:
        validate(cfg, check_sources=False)  # a bad setting fails every process alike, before they connect
    if not distributed.init(resolve_device(cfg.device), cfg.distributed.timeout_s):
        return run_dir
    own, run_dir = run_dir, distributed.broadcast_object(run_dir)
    if not distributed.is_main():
        logging.getLogger("surgeon").setLevel(logging.WARNING)
        if own != run_dir:
            _remove_fresh(own)
    return run_dir


def one_line(message: str) -> str:
    """Hydra's multi-line composition error as one line: its sentences joined, option lists inline."""
    parts = []
    for line in message.split("\nConfig search path:")[0].splitlines():
        text = line.strip().rstrip(".")
        if not text:
            continue
        if line.startswith("\t") and parts:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + text
        else:
            parts.append(text)
    return "; ".join(parts)


def check_overrides(argv: list[str]) -> None:
    """Hydra's own refusals (an unknown preset or key, a malformed override) in surgeon's style, before Hydra makes
    a run folder: one line on stderr, exit 2. Multirun sweeps and Hydra's flags are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from surgeon.config import compose

    try:
        compose(argv)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from surgeon import distributed
    from surgeon.runner import find_resumable, run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    given_dir = any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
    try:
        if cfg.resume and not given_dir and HydraConfig.get().mode.name == "RUN":
            fresh, run_dir = run_dir, find_resumable(cfg)
            _remove_fresh(fresh)
        run_dir = _join_processes(cfg, run_dir)
        record = run(cfg, run_dir, resume_hint=resume_command(run_dir))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        _remove_fresh(run_dir)
        sys.exit(2)
    except (KeyboardInterrupt, distributed.RankStopped):
        if distributed.is_main():
            print(f"\ninterrupted; resume with: {resume_command(run_dir)}", file=sys.stderr)
        sys.exit(130)
    except Exception:
        print(f"failed (record in {run_dir / 'record.json'}); after fixing the cause, resume with: "
              f"{resume_command(run_dir)}", file=sys.stderr)
        raise
    # the process group is joined once per process and closed when it exits (distributed.init): a sweep's jobs
    # share it
    return record["final_ppl"]  # the objective for hydra-optuna-sweeper


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
