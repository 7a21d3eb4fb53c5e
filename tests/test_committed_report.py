"""The committed example report (reports/arithmetic-objectives) agrees with its own metrics.csv:
every variant's final and starting held-out accuracy, recomputed here from the tidy metrics by
hand (mean and Student-t 95% half-width over seeds), is what report.md's table prints."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

REPORT = Path(__file__).resolve().parents[1] / "reports" / "arithmetic-objectives"
T_975_DF2 = 4.302652729911275      # Student's t, 97.5% quantile, 2 degrees of freedom (3 seeds)


def _table_rows(md: str) -> dict[str, list[str]]:
    """variant → cells of the 'Held-out outcome' table."""
    section = md.split("### Held-out outcome", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _cell(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}"


@pytest.mark.skipif(not (REPORT / "metrics.csv").exists(), reason="the committed report is not in this checkout")
def test_committed_report_table_matches_its_metrics_csv():
    df = pd.read_csv(REPORT / "metrics.csv")
    md = (REPORT / "report.md").read_text()
    rows = _table_rows(md)
    assert set(rows) == {"grpo", "dapo", "dr_grpo", "ccrl"}
    after = df[df.metric == "after_stage/heldout_accuracy"]
    for variant, cells in rows.items():
        mine = after[after.variant == variant]
        finals = mine[mine.stage == "rl"].sort_values("seed")["value"].tolist()
        starts = mine[mine.stage == "sft"].sort_values("seed")["value"].tolist()
        assert len(finals) == len(starts) == 3
        for values, cell in ((starts, cells[2]), (finals, cells[3])):
            m = sum(values) / 3
            sd = math.sqrt(sum((v - m) ** 2 for v in values) / 2)
            assert cell == _cell(m, T_975_DF2 * sd / math.sqrt(3)), (variant, cell, values)
    # the findings were written by hand between the markers
    findings = re.search(r"<!-- findings -->(.*)<!-- /findings -->", md, re.S).group(1)
    assert len(findings.split()) > 150
