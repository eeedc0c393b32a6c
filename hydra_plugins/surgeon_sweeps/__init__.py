"""Puts the project's `sweeps/` folder on Hydra's config search path, wherever `run.py` is started from.

`+search=optuna` and `+cluster=slurm` are config groups in `sweeps/`; a `file://sweeps` entry in
conf/config.yaml would be read relative to the working directory. Hydra finds this plugin through
the `hydra_plugins` namespace package, which is importable because `run.py`'s folder (the project
root) is on `sys.path`. It only acts for this project's configs (`conf/`), not for other Hydra apps.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ROOT = Path(__file__).resolve().parents[2]


class SurgeonSweepsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        conf = str(ROOT / "conf")
        if any(element.path in (conf, f"file://{conf}") for element in search_path.get_path()):
            search_path.append(provider="surgeon-sweeps", path=f"file://{ROOT / 'sweeps'}")
