"""Rich tables and plots over records only: the Pareto front as PNG, HTML and a terminal table."""

from greenopt.report.plot import bands, render_front, write_plots

__all__ = ["bands", "render_front", "write_plots"]
