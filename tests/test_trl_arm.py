"""The TRL arm: an rl stage with ``trainer: trl`` trained by TRL's GRPOTrainer, in a compare beside
ccrl's own trainer (same checkpoint, data, rewards and budget), its wall-clock budget, and the
stage keys it refuses (exit 2, naming the key)."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import yaml

from ccrl.cli import main as ccrl_main
from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.pipeline import run_recipe
from ccrl.reporting import read_tidy_csv
from tests.conftest import TINY_LLAMA

pytest.importorskip("trl")

QUIET = {"show_progress": False, "log": lambda *_: None}
DIGITS = {"digits": 1, "ops": "+"}
CORE = {"loss", "reward", "value", "reward/exact_match", "lr", "grad_norm", "accuracy", "completion_tokens",
        "step_time_s", "tokens_per_s", "elapsed_s", "samples"}
"""metrics.jsonl names both trainers log on every rl step"""


def _recipe(tmp_path, **rl) -> dict:
    stage = {"kind": "rl", "objective": "grpo", "steps": 50, "prompts_per_step": 2, "group_size": 2,
             "max_new_tokens": 3, "lr": 1e-3, **rl}
    return {
        "name": "tiny-trl", "seed": 0, "threads": 1, "output_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "model": {"hf_config": copy.deepcopy(TINY_LLAMA)},
        "eval": {"max_new_tokens": 4, "batch_size": 64},
        "rewards": [{"name": "exact_match"}, {"name": "ice", "weight": 0.05}],
        "stages": [
            {"kind": "pretrain", "data": {"task": "arithmetic", "options": DIGITS, "num_examples": 200,
                                          "heldout_size": 16}, "steps": 2, "lr": 3e-3, "batch_size": 8, "seq_len": 32},
            {"kind": "sft", "steps": 2, "lr": 3e-3, "batch_size": 8},
            stage,
        ],
    }


def test_compare_with_a_trl_arm_end_to_end(tmp_path):
    """``ccrl compare`` with a ccrl arm and a TRL arm under one budget of sampled completions: both
    stop at it, the TRL arm's lines carry ccrl's metric names, its checkpoint is a ccrl checkpoint,
    and the report holds its rows, the budget and the paired differences against the baseline."""
    rec = _recipe(tmp_path, eval_every=1)
    rec.update(seeds=[0, 1], shared_stages=["pretrain", "sft"], budget={"kind": "samples", "value": 12},
               baseline="grpo", variants=[{"name": "grpo", "set": {}},
                                          {"name": "trl", "set": {"stages.rl.trainer": "trl"}}])
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(rec))
    assert ccrl_main(["compare", str(path)]) == 0

    runs, report = tmp_path / "runs", tmp_path / "report"
    for variant in ("grpo", "trl"):
        rl = json.loads((runs / variant / "seed0" / "summary.json").read_text())["stages"][-1]
        assert (rl["stopped_by"], rl["steps"], rl["samples"]) == ("max_samples", 3, 12), variant
    lines = {v: [json.loads(x) for x in (runs / v / "seed0" / "metrics.jsonl").read_text().splitlines()]
             for v in ("grpo", "trl")}
    for variant, rows in lines.items():
        rl_rows = [r for r in rows if r["stage"] == "rl"]
        assert [r["step"] for r in rl_rows] == [1, 2, 3]
        assert all(CORE <= set(r) for r in rl_rows), (variant, CORE - set(rl_rows[0]))
        assert [r["samples"] for r in rl_rows] == [4, 8, 12]
        assert all(a["elapsed_s"] < b["elapsed_s"] for a, b in zip(rl_rows, rl_rows[1:]))
        assert "eval/heldout_accuracy" in rl_rows[1]                  # eval_every: 1 (not at the last step)

    # the TRL arm's checkpoint is a ccrl checkpoint: ccrl eval reads it
    assert ccrl_main(["eval", str(runs / "trl" / "seed1" / "rl"), "--task", "arithmetic", "--options",
                      json.dumps(DIGITS), "--max-new-tokens", "3"]) == 0

    text = (report / "report.md").read_text()
    assert "| trl | 2 |" in text and "| grpo | 2 |" in text
    assert "at most 12 sampled completions (`max_samples`)" in text
    assert "### Paired differences against the baseline, grpo" in text and "trl vs grpo:" in text
    assert (report / "heldout_accuracy_seconds.png").stat().st_size > 5_000
    paired = pd.read_csv(report / "paired.csv")
    assert paired["variant"].tolist() == ["trl"] and int(paired["n"].iloc[0]) == 2

    # metrics.csv: the shared stages once per seed, every arm's rows tagged with its variant
    wide = pd.read_csv(report / "metrics.csv")
    assert set(wide["variant"]) == {"shared", "grpo", "trl"}
    shared = wide[wide["variant"] == "shared"]
    assert set(shared["stage"]) == {"pretrain", "sft"} and set(wide[wide["variant"] != "shared"]["stage"]) == {"rl"}
    assert (shared[shared["stage"] == "pretrain"].groupby("seed")["step"].count() == 2).all()
    tidy = read_tidy_csv(report / "metrics.csv")
    trl_rl = tidy[(tidy["variant"] == "trl") & (tidy["stage"] == "rl")]
    assert CORE | {"eval/heldout_accuracy", "after_stage/heldout_accuracy"} <= set(trl_rl["metric"])
    assert set(tidy[(tidy["variant"] == "trl") & (tidy["seed"] == 0)]["stage"]) == {"pretrain", "sft", "rl"}


def test_max_seconds_ends_the_trl_arm_at_the_step_past_it(tmp_path):
    rec = _recipe(tmp_path, trainer="trl", steps=500, max_seconds=0.3)
    rec["stages"] = [rec["stages"][0], rec["stages"][2]]
    summary = run_recipe(rec, **QUIET)
    rl = summary["stages"][-1]
    assert rl["stopped_by"] == "max_seconds" and 1 <= rl["steps"] < 500
    rows = [json.loads(x) for x in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "rl"]
    assert len(rows) == rl["steps"] and rows[-1]["elapsed_s"] >= 0.3
    assert all(r["elapsed_s"] < 0.3 for r in rows[:-1])               # it ended at the first step past the budget
    assert rl["metrics"]["heldout_accuracy"] >= 0.0                   # scored by ccrl's evaluation afterwards


@pytest.mark.parametrize("changes, key", [
    ({"objective": "ccrl"}, "stages[2].trainer"),
    ({"objective": "dapo"}, "stages[2].dynamic_sampling"),
    ({"advantage_clip": [0, 1]}, "stages[2].advantage_clip"),
    ({"ppo_epochs": 2, "early_stop": {"accuracy": 0.5}}, "stages[2].ppo_epochs"),
    ({"kl_guard": 0.001}, "stages[2].kl_guard"),
    ({"routing_replay": True}, "stages[2].routing_replay"),
    ({"micro_batch_size": 3}, "stages[2].micro_batch_size"),
])
def test_keys_trl_cannot_honour_are_refused_naming_the_key(tmp_path, changes, key):
    rec = _recipe(tmp_path, trainer="trl", **changes)
    rec["model"] = {"preset": "toy"}                     # a council policy, so objective ccrl is otherwise valid
    with pytest.raises(RecipeError) as err:
        load_recipe(rec)
    assert key in str(err.value)
    if "early_stop" in changes:                           # every refused key is listed
        assert "stages[2].early_stop" in str(err.value)


def test_ccrl_check_exits_2_on_a_trl_stage_it_cannot_honour(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, trainer="trl", objective="ccrl")))
    assert ccrl_main(["check", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "stages[2].trainer: trl cannot train objective 'ccrl'" in err and "Traceback" not in err
    path.write_text(yaml.safe_dump(_recipe(tmp_path, trainer="trl", objective="dapo", dynamic_sampling=False)))
    assert ccrl_main(["check", str(path)]) == 0


def test_settings_map_to_grpo_config(tmp_path):
    from trl import GRPOConfig

    from ccrl.objectives import get_objective
    from ccrl.trainers.rl import resolve_hparams
    from ccrl.trainers.trl_arm import grpo_config_kwargs

    rec = load_recipe(_recipe(tmp_path, trainer="trl", objective="dr_grpo", kl_beta=0.01, steps=7, prompts_per_step=3,
                              group_size=4, micro_batch_size=6, max_new_tokens=5, temperature=0.7, lr=2e-5))
    stage = rec.stages[-1]
    kw = grpo_config_kwargs(stage, resolve_hparams(stage, get_objective(stage.objective)), seed=3,
                            output_dir=str(tmp_path / "trl"), cpu=True, mixed_precision="no")
    assert {k: kw[k] for k in ("loss_type", "scale_rewards", "epsilon", "epsilon_high", "beta", "num_generations",
                               "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                               "max_completion_length", "temperature", "learning_rate", "seed")} == {
        "loss_type": "dr_grpo", "scale_rewards": "none", "epsilon": 0.2, "epsilon_high": 0.2, "beta": 0.01,
        "num_generations": 4, "per_device_train_batch_size": 6, "gradient_accumulation_steps": 2, "max_steps": 7,
        "max_completion_length": 5, "temperature": 0.7, "learning_rate": 2e-5, "seed": 3}
    config = GRPOConfig(**kw)                                          # TRL accepts every field
    assert config.generation_batch_size == 12                          # 3 prompts × 4 completions per step


def test_a_reward_reading_council_statistics_is_refused_where_it_is_written(tmp_path):
    rec = _recipe(tmp_path, trainer="trl")
    rec["model"] = {"preset": "toy"}
    rec["rewards"].append({"name": "council_consensus", "weight": 0.1})
    with pytest.raises(RecipeError, match=r"rewards\[2\]: reward 'council_consensus' reads council_weights"):
        load_recipe(rec)


def test_a_run_of_a_compare_with_a_trl_arm_is_one_recipe(tmp_path):
    """A compare whose arms are objective ccrl and a TRL arm: valid, and the TRL arm's run (what
    ``ccrl run RECIPE --set <its overrides>`` loads) is valid on its own, while validating the
    ccrl arm on top of the TRL arm's overrides would not be."""
    rec = _recipe(tmp_path)
    rec["model"] = {"preset": "toy"}
    rec["variants"] = [{"name": "ccrl", "set": {"stages.rl.objective": "ccrl"}},
                       {"name": "trl", "set": {"stages.rl.trainer": "trl"}}]
    load_recipe(rec)
    trl_run = load_recipe(rec, {"stages.rl.trainer": "trl"}, check_variants=False)
    assert trl_run.stage("rl").trainer == "trl"
    with pytest.raises(RecipeError, match=r"variants\[0\] \(ccrl\).*stages\[2\].trainer"):
        load_recipe(rec, {"stages.rl.trainer": "trl"})


def test_trl_row_doctest():
    import doctest

    import ccrl.trainers.trl_arm as arm

    assert doctest.testmod(arm).failed == 0
