"""A compare's baseline and budget: paired differences with a Student-t interval (checked against
numbers worked by hand), the budget's overrides and its checks, and ``metrics.csv`` with shared
stages once per seed (small enough to commit, and read back to the same numbers; the long
``metrics.csv`` of earlier versions still reads)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.reporting.compare import budget_overrides, fingerprint
from ccrl.reporting.metrics import SHARED, read_tidy_csv, write_metrics_csv
from ccrl.reporting.report import paired_differences, paired_sentence, paired_verdict, per_run_values

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


def _long_layout_tidy() -> pd.DataFrame:
    """A long-layout table as earlier versions wrote it: 2 arms × 3 seeds, each arm repeating the
    shared pretrain and SFT steps, 32 persona shares per RL step."""
    rows = []
    for variant in ("grpo", "ccrl"):
        for seed in range(3):
            for stage, steps in (("pretrain", 200), ("sft", 250)):
                rows += [(variant, seed, stage, stage, k, "loss", 3.0 / k + seed) for k in range(1, steps + 1)]
                rows.append((variant, seed, stage, stage, steps, "after_stage/heldout_accuracy", 0.1 * seed + 0.05))
            for k in range(1, 101):
                rows.append((variant, seed, "rl", "rl", k, "reward", 0.123456789 * k / 100 + seed))
                rows += [(variant, seed, "rl", "rl", k, f"persona_usage/{i:02d}", (i + k % 7) / 700.0)
                         for i in range(32)]
            rows.append((variant, seed, "rl", "rl", 100, "after_stage/heldout_accuracy",
                         0.3 + 0.1 * seed + (variant == "ccrl") * 0.05))
    return pd.DataFrame(rows, columns=["variant", "seed", "stage", "kind", "step", "metric", "value"])


def test_long_layout_still_reads_and_todays_layout_gives_the_same_per_run_values(tmp_path):
    """A ``metrics.csv`` in the long layout of earlier versions (every arm repeating the shared
    stages) still reads; written in today's layout (shared stages once per seed, persona shares as
    their stage means) it is a fraction of the size and gives the same per-run values."""
    from ccrl.reporting.metrics import stage_means

    long_path = tmp_path / "long.csv"
    _long_layout_tidy().to_csv(long_path, index=False)
    old = read_tidy_csv(long_path)
    assert set(old["variant"]) == {"grpo", "ccrl"} and len(old) == len(_long_layout_tidy())
    collapsed = old.assign(variant=old["variant"].where(~old["stage"].isin(["pretrain", "sft"]), SHARED))
    collapsed = collapsed.drop_duplicates(["variant", "seed", "stage", "step", "metric"])
    path = write_metrics_csv(stage_means(collapsed), tmp_path / "metrics.csv")
    assert path.stat().st_size < long_path.stat().st_size / 5
    new = read_tidy_csv(path)
    a, b = per_run_values(old), per_run_values(new)
    for col in ("start_accuracy", "final_accuracy", "best_accuracy", "max_persona_share"):
        assert b[col].tolist() == pytest.approx(a[col].tolist(), abs=1e-8), col
    # per-step values keep 4 significant digits: the step mean moves by less than 1e-4 of itself
    assert b["reward_mean"].tolist() == pytest.approx(a["reward_mean"].tolist(), rel=1e-4)
    raw = pd.read_csv(path)
    assert (raw[raw["variant"] == SHARED].groupby(["seed", "stage"])["step"].nunique() >= 200).all()
    assert not raw[(raw["variant"] != SHARED) & raw["stage"].isin(["pretrain", "sft"])].shape[0]
    assert not any(c.startswith("persona_usage/") for c in raw.columns)
    assert sum(c.startswith("stage_mean/persona_usage/") for c in raw.columns) == 32


def test_thin_steps_keeps_compared_stages_whole_and_spaces_the_others():
    from ccrl.reporting.metrics import thin_steps

    tidy = _long_layout_tidy()
    thin = thin_steps(tidy, keep={"rl"}, max_steps=100)
    per = thin[thin["metric"] == "loss"].groupby(["variant", "seed", "stage"])["step"]
    assert (per.nunique() == 100).all()                                   # 200 and 250 logged steps → 100
    sft = thin[(thin.variant == "grpo") & (thin.seed == 0) & (thin.stage == "sft") & (thin.metric == "loss")]
    steps = sft["step"].tolist()
    assert steps[0] == 1 and steps[-1] == 250 and max(b - a for a, b in zip(steps, steps[1:])) <= 3
    # every held-out row and every row of the kept stage stays
    held = tidy["metric"].str.startswith("after_stage/")
    assert len(thin[thin["metric"].str.startswith("after_stage/")]) == held.sum()
    assert len(thin[thin.stage == "rl"]) == len(tidy[tidy.stage == "rl"])
    assert len(thin_steps(tidy, keep={"rl", "sft", "pretrain"})) == len(tidy)
