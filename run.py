"""Entry point: `python run.py [overrides]` (Hydra). See README.md for the keys."""
import os

# torch's spin-waiting OpenMP threads can slow eigh/Cholesky by orders of magnitude on busy machines
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from surgeon.config import ConfigError, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from surgeon.runner import run

    try:
        record = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        logging.getLogger("surgeon").error("config error: %s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return record["final_ppl"]  # the objective for hydra-optuna-sweeper


if __name__ == "__main__":
    main()
