"""Run reports, comparison reports and the figures in them (see `pipeline.report`, `pipeline.visualize`)."""
from pipeline.reporting.report import (OBJECTIVES, write_comparison_report,  # noqa: F401
                                       write_report, write_run_report)
