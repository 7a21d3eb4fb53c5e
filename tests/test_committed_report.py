"""The committed comparison reports (reports/arithmetic-objectives, reports/rules-objectives) agree
with their own metrics.csv. Everything is recomputed here by hand from the CSV (pandas and the
Student-t quantile only, none of ccrl's report code):

- the held-out table's before / final cells (mean ± t·sd/√n over the seeds);
- the paired differences against DAPO (per seed, mean, 95% interval, verdict), in report.md and
  in paired.csv;
- every number the hand-written findings quote in the forms "<arm> − <other arm>: +0.012" (the
  mean over seeds of the paired difference of final held-out accuracy), "<arm> gained +12.3 points" (mean change over the RL stage, in points), "<arm> kept
  H_Ω at 1.23 nats" (mean council entropy at rollout over the RL steps) and "<arm>: better / worse /
  not separable" (the paired verdict);
- the size limit of metrics.csv (under 2 MB)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1] / "reports"
REPORTS = ["arithmetic-objectives", "rules-objectives"]
ARMS = ["ccrl", "ccrl_beta0", "dapo", "grpo", "dr_grpo", "trl"]
BASELINE = "dapo"
SEEDS = [0, 1, 2, 3, 4]
T_975_DF4 = 2.7764451051977987     # Student's t, 97.5% quantile, 4 degrees of freedom (5 seeds)
HELDOUT = "after_stage/heldout_accuracy"
ENTROPY = "council/entropy_rollout"


def _mean_half(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T_975_DF4 * sd / math.sqrt(n)


def _signed(x: float, decimals: int = 3) -> str:
    return f"{x:+.{decimals}f}"


def _section_rows(md: str, heading: str) -> dict[str, list[str]]:
    """first cell → cells of the first markdown table under ``heading``."""
    lines = []
    for line in md.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            lines.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif lines:
            break
    assert len(lines) > 2 and set("".join(lines[1])) <= set(":- "), heading   # header, rule, rows
    return {cells[0]: cells for cells in lines[2:]}


class Report:
    def __init__(self, name: str):
        self.dir = ROOT / name
        self.md = (self.dir / "report.md").read_text()
        self.csv = pd.read_csv(self.dir / "metrics.csv")
        df = self.csv
        start = df[(df.variant == "shared") & (df.stage == "sft")].dropna(subset=[HELDOUT])
        self.start = {int(r.seed): float(r[HELDOUT]) for _, r in start.iterrows()}
        final = df[(df.variant != "shared") & (df.stage == "rl")].dropna(subset=[HELDOUT])
        self.final = {(r.variant, int(r.seed)): float(r[HELDOUT]) for _, r in final.iterrows()}
        rl = df[(df.variant != "shared") & (df.stage == "rl")]
        self.entropy = {(v, int(s)): float(g[ENTROPY].dropna().mean()) for (v, s), g in rl.groupby(["variant", "seed"])}

    def finals(self, arm: str) -> list[float]:
        return [self.final[(arm, s)] for s in SEEDS]

    def paired(self, arm: str, base: str = BASELINE) -> tuple[dict[int, float], float, float]:
        diffs = {s: self.final[(arm, s)] - self.final[(base, s)] for s in SEEDS}
        m, h = _mean_half(list(diffs.values()))
        return diffs, m, h

    def verdict(self, arm: str) -> str:
        _, m, h = self.paired(arm)
        return "better" if m - h > 0 else "worse" if m + h < 0 else "not separable at 5 seeds"

    def findings(self) -> str:
        return re.search(r"<!-- findings -->(.*)<!-- /findings -->", self.md, re.S).group(1)


def _report(name: str) -> Report:
    if not (ROOT / name / "metrics.csv").exists():
        pytest.skip(f"reports/{name} is not in this checkout")
    return Report(name)


@pytest.mark.parametrize("name", REPORTS)
def test_metrics_csv_is_small_and_complete(name):
    r = _report(name)
    assert (r.dir / "metrics.csv").stat().st_size < 2_000_000
    assert sorted(r.start) == SEEDS                         # the shared stages: once per seed
    assert set(r.final) == {(a, s) for a in ARMS for s in SEEDS}
    assert (r.csv.variant == "shared").sum() > 0 and set(r.csv.variant) == {"shared", *ARMS}


@pytest.mark.parametrize("name", REPORTS)
def test_heldout_table_matches_metrics_csv(name):
    r = _report(name)
    rows = _section_rows(r.md, "### Held-out outcome")
    assert set(rows) == set(ARMS)
    starts = [r.start[s] for s in SEEDS]
    for arm in ARMS:
        for values, cell in ((starts, rows[arm][2]), (r.finals(arm), rows[arm][3])):
            m, h = _mean_half(values)
            assert cell == f"{m:.3f} ± {h:.3f}", (arm, cell, values)


@pytest.mark.parametrize("name", REPORTS)
def test_paired_differences_against_dapo_match_metrics_csv(name):
    r = _report(name)
    rows = _section_rows(r.md, f"### Paired differences against the baseline, {BASELINE}")
    paired_csv = pd.read_csv(r.dir / "paired.csv").set_index("variant")
    assert set(rows) == set(ARMS) - {BASELINE} == set(paired_csv.index)
    for arm in rows:
        diffs, m, h = r.paired(arm)
        cells = rows[arm]
        assert cells[1] == "5"
        assert cells[2] == ", ".join(f"{s}: {_signed(d)}" for s, d in diffs.items())
        assert cells[3] == _signed(m)
        assert cells[4] == f"[{_signed(m - h)}, {_signed(m + h)}]"
        assert cells[5] == r.verdict(arm)
        row = paired_csv.loc[arm]
        assert row["mean"] == pytest.approx(m, abs=1e-9) and row["ci95"] == pytest.approx(h, abs=1e-9)
        assert {int(k): v for k, v in json.loads(row["diffs"]).items()} == pytest.approx(diffs, abs=1e-9)


@pytest.mark.parametrize("name", REPORTS)
def test_findings_quote_numbers_that_follow_from_metrics_csv(name):
    r = _report(name)
    text = r.findings().replace("−", "-")
    checked = 0
    for arm, base, value in re.findall(r"`?(\w+)`? - `?(\w+)`?: ([+-]\d\.\d{3})", text):
        assert value == _signed(r.paired(arm, base)[1]), (arm, base, value)
        checked += 1
    for arm, value in re.findall(r"`?(\w+)`? gained ([+-]\d+\.\d) points", text):
        gain = sum(r.final[(arm, s)] - r.start[s] for s in SEEDS) / len(SEEDS) * 100
        assert value == f"{gain:+.1f}", (arm, value, gain)
        checked += 1
    for arm, value in re.findall(r"`?(\w+)`? kept H_Ω at (\d\.\d{2}) nats", text):
        h = sum(r.entropy[(arm, s)] for s in SEEDS) / len(SEEDS)
        assert value == f"{h:.2f}", (arm, value, h)
        checked += 1
    for arm, verdict in re.findall(r"`?(\w+)`? vs dapo is (better|worse|not separable)", text):
        assert r.verdict(arm).startswith(verdict), (arm, verdict)
        checked += 1
    assert checked >= 8, f"the findings of {name} quote only {checked} checkable numbers"
    assert len(text.split()) > 150


README_ARMS = {"CCRL": "ccrl", "CCRL, β = 0": "ccrl_beta0", "DAPO": "dapo", "GRPO": "grpo", "Dr. GRPO": "dr_grpo",
               "TRL `GRPOTrainer`": "trl"}


def test_readme_headline_table_follows_from_the_reports():
    """README's "Comparing objectives" table: each arm's mean change (points) and paired difference
    against DAPO [95% interval] on both tasks, as the reports' metrics.csv give them."""
    reports = [_report(name) for name in REPORTS]
    readme = (ROOT.parent / "README.md").read_text()
    rows = _section_rows(readme, "## Comparing objectives")
    assert set(rows) == set(README_ARMS)
    for label, arm in README_ARMS.items():
        cells = [c.replace("−", "-") for c in rows[label]]          # the README writes minus signs
        for r, change, paired in zip(reports, (cells[1], cells[3]), (cells[2], cells[4])):
            gain = sum(r.final[(arm, s)] - r.start[s] for s in SEEDS) / len(SEEDS) * 100
            assert change.strip("*") == f"{gain:+.1f}", (label, change)
            if arm == BASELINE:
                assert paired == "(baseline)"
                continue
            _, m, h = r.paired(arm)
            mean = f"**{_signed(m)}**" if r.verdict(arm) == "better" else _signed(m)   # bold: better than DAPO
            assert paired == f"{mean} [{_signed(m - h)}, {_signed(m + h)}]", (label, paired)
