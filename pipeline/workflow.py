"""What happens after a training or a search: export for serving, then the report.

Kept apart from `pipeline.cli` (flags) and from `pipeline.serving` /
`pipeline.reporting` (each knows only its own job): this module is the one
place that chains them, for `pipeline.train`, `pipeline.finetune` and
`pipeline.tune`. Both are imported lazily: a run without export needs no
SavedModel code, a comparison without runs needs no TensorFlow.
"""
from __future__ import annotations

from typing import Optional


def _export(model_dir: str, export_dir: str, name: Optional[str]) -> None:
    """Export a run's best checkpoint as the next SavedModel version and print where it went."""
    from pipeline.serving import export as export_lib
    print(f"export: {export_lib.export_run(model_dir, export_root=export_dir, name=name)}", flush=True)


def after_training(result, *, export: bool = True, export_dir: str = "saved_models",
                   export_name: Optional[str] = None, report: bool = True):
    """Export the run's best checkpoint, then write its report; returns `result`.

    Only the chief of a multi-worker job exports (`result.is_chief`), so a job
    leaves one version.
    """
    if not getattr(result, "is_chief", True):
        return result
    if export:
        _export(result.model_dir, export_dir, export_name)
    if report:
        from pipeline import reporting
        _, html = reporting.write_run_report(result.model_dir, export_roots=[export_dir])
        print(f"report: {html}", flush=True)
    return result


def after_search(result, tune_dir: str, *, verb: str, export_best: bool = False,
                 export_dir: str = "saved_models", export_name: Optional[str] = None,
                 report: bool = True):
    """After a search's chief finished: print how to train the best trial, export it, compare the trials."""
    if result.best is not None:
        print(f"train the best model: python -m pipeline.{verb} --flagfile={result.best_cfg}", flush=True)
        if export_best:
            _export(result.best.run_dir, export_dir, export_name)
    if report and result.rows:
        from pipeline import reporting
        _, html = reporting.write_comparison_report([tune_dir])
        print(f"report: {html}", flush=True)
    return result
