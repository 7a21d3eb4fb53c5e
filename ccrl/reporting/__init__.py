"""Reports: read run outputs, run comparisons of variants × seeds, write ``report.md`` with
tables (mean ± 95% CI over seeds, paired differences against a baseline), ``metrics.csv`` and PNG
plots.

- :func:`run_compare` runs a recipe's variants × seeds (resumable) and writes the report;
- :func:`build_report` writes the report for runs that already exist;
- :func:`load_run`, :func:`discover_runs`, :func:`tidy_metrics` read run directories;
  :func:`read_tidy_csv` / :func:`write_metrics_csv` read and write ``metrics.csv``;
- :func:`paired_differences` compares arms with a baseline seed by seed.

Importing this package is cheap: pandas and matplotlib load inside the functions.
"""

from __future__ import annotations

from ccrl.reporting.compare import run_compare
from ccrl.reporting.metrics import (
    RunRecord,
    discover_runs,
    load_run,
    read_tidy_csv,
    tidy_metrics,
    write_metrics_csv,
)
from ccrl.reporting.report import (
    build_report,
    mean_ci,
    paired_differences,
    per_run_values,
    pipeline_table,
    t_quantile_975,
    variant_table,
)

__all__ = [
    "RunRecord",
    "build_report",
    "discover_runs",
    "load_run",
    "mean_ci",
    "paired_differences",
    "per_run_values",
    "pipeline_table",
    "read_tidy_csv",
    "run_compare",
    "t_quantile_975",
    "tidy_metrics",
    "variant_table",
    "write_metrics_csv",
]
