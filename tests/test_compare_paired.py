"""A compare's baseline and budget: paired differences with a Student-t interval (checked against
numbers worked by hand), the budget's overrides and its checks, and ``metrics.csv`` with shared
stages once per seed (small enough to commit, and read back to the same numbers; the long
``metrics.csv`` of earlier versions still reads)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.reporting.compare import budget_overrides, fingerprint
from ccrl.reporting.metrics import SHARED, read_tidy_csv, write_metrics_csv
from ccrl.reporting.report import paired_differences, paired_sentence, paired_verdict, per_run_values

COMMITTED = Path(__file__).resolve().parents[1] / "reports" / "arithmetic-objectives" / "metrics.csv"
T_975_DF2 = 4.303                      # Student's t, 97.5% quantile, 2 degrees of freedom (any t table)


def _per_run(finals: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"variant": v, "seed": k, "final_accuracy": x}
                         for v, xs in finals.items() for k, x in enumerate(xs)])


def test_paired_differences_by_hand():
    # arm − baseline per seed: 0.1, 0.2, 0.3 → mean 0.2, s = 0.1, half-width 4.303 · 0.1 / √3 = 0.2484
    per_run = _per_run({"base": [0.5, 0.4, 0.3], "arm": [0.6, 0.6, 0.6], "flat": [0.5, 0.4, 0.3]})
    table = paired_differences(per_run, "base").set_index("variant")
    arm = table.loc["arm"]
    assert arm["diffs"] == pytest.approx({0: 0.1, 1: 0.2, 2: 0.3})
    assert arm["n"] == 3 and arm["mean"] == pytest.approx(0.2, abs=1e-12)
    assert arm["ci95"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3), abs=1e-4)
    assert arm["low"] == pytest.approx(0.2 - 0.24844, abs=1e-4) and arm["high"] == pytest.approx(0.44844, abs=1e-4)
    assert arm["verdict"] == "not separable at 3 seeds"           # the interval [−0.048, 0.448] holds 0
    assert table.loc["flat", "mean"] == 0.0 and table.loc["flat", "verdict"] == "not separable at 3 seeds"
    assert "base" not in table.index
    sentence = paired_sentence(table.reset_index().iloc[0])
    assert sentence == ("arm vs base: final held-out accuracy +0.200 on average over 3 paired seeds "
                        "(95% CI [-0.048, +0.448]): not separable at 3 seeds.")


def test_paired_verdicts():
    # diffs 0.10, 0.11, 0.12: mean 0.11, s = 0.01, half 0.0248 → wholly above 0
    assert paired_verdict(0.11, T_975_DF2 * 0.01 / math.sqrt(3), 3) == "better"
    assert paired_verdict(-0.11, 0.0248, 3) == "worse"
    assert paired_verdict(0.2, 0.25, 3) == "not separable at 3 seeds"
    assert paired_verdict(0.5, math.nan, 1) == "not separable at 1 seed"
    per_run = _per_run({"base": [0.5, 0.4, 0.3], "arm": [0.6, 0.51, 0.42]})
    assert paired_differences(per_run, "base")["verdict"].tolist() == ["better"]
    # only the seeds both arms have are paired
    uneven = pd.concat([per_run, pd.DataFrame([{"variant": "arm", "seed": 7, "final_accuracy": 0.9}])])
    assert paired_differences(uneven, "base")["n"].tolist() == [3]


def _compare(tiny_recipe, **top) -> dict:
    rec = tiny_recipe(**top)
    rec["stages"].append({"kind": "rl", "objective": "grpo", "steps": 50, "prompts_per_step": 2, "group_size": 2,
                          "max_new_tokens": 3, "rewards": [{"name": "exact_match"}]})
    rec.setdefault("variants", [{"name": "grpo", "set": {}}, {"name": "dr", "set": {"stages.rl.objective": "dr_grpo"}}])
    rec.setdefault("shared_stages", ["pretrain", "sft"])
    return rec


def test_budget_sets_every_arms_rl_stage_and_is_checked(tiny_recipe):
    rec = load_recipe(_compare(tiny_recipe, budget={"kind": "seconds", "value": 90}, baseline="dr"))
    assert budget_overrides(rec) == {"stages.rl.max_seconds": 90.0}
    assert budget_overrides(load_recipe(_compare(tiny_recipe, budget={"kind": "samples", "value": 64}))) == {
        "stages.rl.max_samples": 64}
    raw = rec.raw
    assert fingerprint(raw, {"stages.rl.max_seconds": 90.0}, 0) != fingerprint(raw, {}, 0)   # a budget is another run

    bad = _compare(tiny_recipe, budget={"kind": "seconds", "value": 90})
    bad["variants"][1]["set"]["stages.rl.max_seconds"] = 10
    with pytest.raises(RecipeError, match=r"variants\[1\] \(dr\)\.set\.stages\.rl\.max_seconds: the compare's budget"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="budget: value: expected a whole number of completions"):
        load_recipe(_compare(tiny_recipe, budget={"kind": "samples", "value": 2.5}))
    with pytest.raises(RecipeError, match="budget: sets the budget of the rl stages after the shared stages"):
        load_recipe(tiny_recipe(budget={"kind": "seconds", "value": 9}))
    with pytest.raises(RecipeError, match=r"baseline: expected the name of one of the variants \['grpo', 'dr'\]"):
        load_recipe(_compare(tiny_recipe, baseline="dapo"))
    shared = _compare(tiny_recipe)
    shared["variants"][0]["name"] = SHARED
    from ccrl.reporting.compare import run_plan

    with pytest.raises(RecipeError, match="'shared' names the shared stages' rows"):
        run_plan(load_recipe(shared))


@pytest.mark.skipif(not COMMITTED.exists(), reason="the committed report is not in this checkout")
def test_committed_style_metrics_fit_well_under_2_mb_and_read_back_the_same(tmp_path):
    """The committed report's metrics.csv (long layout, 6 MB: every arm repeated the shared pretrain
    and SFT steps) still reads; written in today's layout it is under 2 MB and gives the same
    per-run values."""
    old = read_tidy_csv(COMMITTED)
    assert set(old["variant"]) == {"grpo", "dapo", "dr_grpo", "ccrl"}
    collapsed = old.assign(variant=old["variant"].where(~old["stage"].isin(["pretrain", "sft"]), SHARED))
    collapsed = collapsed.drop_duplicates(["variant", "seed", "stage", "step", "metric"])
    path = write_metrics_csv(collapsed, tmp_path / "metrics.csv")
    assert path.stat().st_size < 2_000_000 < COMMITTED.stat().st_size
    new = read_tidy_csv(path)
    assert len(new) == len(old)
    a, b = per_run_values(old), per_run_values(new)
    for col in ("start_accuracy", "final_accuracy", "best_accuracy", "heldout_value"):
        assert b[col].tolist() == pytest.approx(a[col].tolist(), abs=1e-9), col
    assert b["reward_mean"].tolist() == pytest.approx(a["reward_mean"].tolist(), rel=1e-5)
    raw = pd.read_csv(path)
    assert (raw[raw["variant"] == SHARED].groupby(["seed", "stage"])["step"].nunique() >= 200).all()
    assert not raw[(raw["variant"] != SHARED) & raw["stage"].isin(["pretrain", "sft"])].shape[0]
