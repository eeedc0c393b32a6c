"""LLM Surgeon: Kronecker-factored curvature pruning of large language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # `surgeon.load_compact`, imported on first use (so `python -m surgeon.compact` runs the module only once)
    if name == "load_compact":
        from .compact import load_compact

        return load_compact
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
