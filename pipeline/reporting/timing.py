"""The report's account of a run's time: the estimate it printed against the actual, and its time budget.

Why: a user who gave `--time_budget` needs to read why the run trained at this
resolution for this many steps (the choice `pipeline.training.budget` made,
stored in config.json), and anyone comparing runs needs to know whether the
first estimate (`pipeline.training.eta`, in summary.json) can be trusted.
"""
from __future__ import annotations

from pipeline.durations import format_duration
from pipeline.reporting.document import Para


def time_blocks(summary: dict, config: dict) -> list:
    """Paragraphs on the run's estimate, its budget's choice and the HyperRule's step scaling."""
    timing, train = summary.get("time") or {}, config.get("train") or {}
    blocks = []
    if timing.get("estimated_seconds") is not None:
        actual = summary.get("wall_seconds")
        text = (f"Estimated run time {format_duration(timing['estimated_seconds'])} after "
                f"{timing.get('estimated_after_steps')} steps ({timing.get('step_seconds')} s per step)")
        if actual:
            text += f"; actual {format_duration(actual)} (x{actual / max(timing['estimated_seconds'], 1e-9):.2f})"
        blocks.append(Para([text + "."], "note"))
    if timing.get("slow_warning"):
        blocks.append(Para([timing["slow_warning"]], "warn"))
    plan = timing.get("budget_plan") or train.get("time_budget_plan")
    if plan:
        stop = (" The run reached its budget and stopped after a finished epoch (status budget_exhausted)."
                if timing.get("budget_exhausted") else "")
        blocks.append(Para(["Time budget: " + plan + stop]))
    if train.get("schedule") == "hyperrule":
        from pipeline import hyperrule
        mode = train.get("hyperrule_steps") or "scaled"
        blocks.append(Para(["HyperRule step budget (", ("code", f"--hyperrule_steps={mode}"), "): "
                            f"{hyperrule.STEP_SCALING.get(mode, mode)}."], "note"))
    return blocks
