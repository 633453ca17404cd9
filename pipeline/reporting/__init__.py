"""Run reports, comparison reports and the figures in them (see `pipeline.report`, `pipeline.visualize`).

    write_run_report(model_dir)              <run>/report.md and .html (`run_report`)
    write_comparison_report([run, ...], out) comparison.md and .html (`comparison`)
    write_report(paths, compare=...)         the one `pipeline.report` needs

Modules: `document` (the blocks a report is made of) and `render` (markdown,
HTML); `run_data` (a run's numbers), `status` (finished, running or
interrupted), `exports` (its SavedModels); `settings` (config.json by flag
name); `plots` (run figures), `network` and `views` (what the network
learned), `visualization` (`make_plots`, behind `pipeline.visualize`);
`mistakes` (per-class P/R/F1, highest-loss images, calibration, TTA, class
counts), `lr_plot` (the figure of `pipeline.lr_find`).
"""
import os
from typing import Optional

from pipeline.tuning.layout import OBJECTIVES, is_tuning_dir

__all__ = ["OBJECTIVES", "write_comparison_report", "write_report", "write_run_report"]


def __getattr__(name):
    """The report writers load matplotlib: imported on first use, so `pipeline.report --help` is instant."""
    if name == "write_run_report":
        from pipeline.reporting.run_report import write_run_report
        return write_run_report
    if name == "write_comparison_report":
        from pipeline.reporting.comparison import write_comparison_report
        return write_comparison_report
    raise AttributeError(f"module 'pipeline.reporting' has no attribute {name!r}")


def write_report(paths, *, compare: bool = False, out: Optional[str] = None,
                 objective: Optional[str] = None, export_roots=None, evaluate: bool = True):
    """One run's report, or a comparison of several runs (or of a tuning directory's trials).

    A comparison is made when `compare` is set, when several paths are given,
    or when the one path is a tuning directory. Returns (markdown path, html path).
    """
    if not paths:
        raise ValueError("give --model_dir=<run>, or --compare <run> <run> ... (or a tuning directory).")
    if compare or len(paths) > 1 or (os.path.isdir(paths[0]) and is_tuning_dir(paths[0])):
        from pipeline.reporting.comparison import write_comparison_report
        return write_comparison_report(paths, out, objective=objective)
    if out:
        raise ValueError("--out is for --compare; a run's report goes into the run directory.")
    from pipeline.reporting.run_report import write_run_report
    return write_run_report(paths[0], export_roots=export_roots, evaluate=evaluate)
