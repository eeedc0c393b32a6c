"""LLM Surgeon: Kronecker-factored curvature pruning of large language models."""

__version__ = "0.1.0"
