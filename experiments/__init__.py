"""Experiments: tables and figures regenerated from result records (`python -m experiments.report`)."""
from experiments.plots import plot_allocation, plot_ppl_vs_size
from experiments.tables import build_tables, load_records, to_latex, to_markdown

__all__ = ["build_tables", "load_records", "plot_allocation", "plot_ppl_vs_size", "to_latex", "to_markdown"]
