"""Speed and memory measurements behind `python -m pipeline.benchmark` (see BENCHMARKS.md).

`run_benchmarks(what=..., model=..., ...)` runs and prints a measurement plan
(`plan.py`); the measurements themselves are in `benchmarks.py`, the data they
run on in `synthetic.py`, the machine facts stamped on them in `machine.py`.
"""
from pipeline.perf.plan import WHATS, run_benchmarks, table  # noqa: F401
