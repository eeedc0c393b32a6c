import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose(overrides=()):
    """The config `python run.py <overrides>` would run, composed without running."""
    from surgeon.config import compose as compose_config

    return compose_config(overrides)


@pytest.fixture
def shared():
    from surgeon.config import shared_dir

    path = shared_dir()
    if not (path / "models").is_dir():
        pytest.skip(f"testbed not found at {path} (set SURGEON_SHARED)")
    return path
