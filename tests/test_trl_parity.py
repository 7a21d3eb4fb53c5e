"""recipes/trl_grpo.yaml reproduces TRL GRPOTrainer's defaults, read from the installed trl's
GRPOConfig (and DPOConfig for the preference stage defaults docs/trl-mapping.md says are equal);
the ``trl_dapo`` preset is TRL's ``loss_type="dapo"``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ccrl.config import load_recipe
from ccrl.objectives import get_objective
from ccrl.trainers.rl import resolve_hparams

ROOT = Path(__file__).resolve().parents[1]


def _defaults(cls) -> dict:
    """A config dataclass's field defaults (without instantiating it: TRL's bf16 default needs a GPU)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.fixture(scope="module")
def grpo():
    trl = pytest.importorskip("trl")
    return _defaults(trl.GRPOConfig)


@pytest.fixture(scope="module")
def rl_stage():
    return load_recipe(ROOT / "recipes" / "trl_grpo.yaml").stage("rl")


def test_trl_grpo_recipe_matches_grpoconfig_defaults(grpo, rl_stage):
    st = rl_stage
    hp = resolve_hparams(st, get_objective(st.objective))
    trl_eps_high = grpo["epsilon_high"] if grpo["epsilon_high"] is not None else grpo["epsilon"]
    # TRL's loss types → ccrl's aggregation (tests/test_objectives_trl.py checks the losses themselves)
    assert {"grpo": "sequence", "bnpo": "token", "dr_grpo": "constant", "dapo": "token"}[grpo["loss_type"]] \
        == hp["aggregation"]
    mapped = {
        "epsilon": (hp["eps_low"], grpo["epsilon"]),
        "epsilon_high": (hp["eps_high"], trl_eps_high),
        "beta": (hp["kl_beta"], grpo["beta"]),
        "scale_rewards": (hp["scale"], grpo["scale_rewards"]),
        "importance_sampling_level": (hp["importance_sampling_level"], grpo["importance_sampling_level"]),
        "num_iterations": (st.ppo_epochs, grpo["num_iterations"]),
        "num_generations": (st.group_size, grpo["num_generations"]),
        "generation batch (completions per step)": (
            st.prompts_per_step * st.group_size,
            grpo["per_device_train_batch_size"] * grpo["gradient_accumulation_steps"]),
        "max_completion_length": (st.max_new_tokens, grpo["max_completion_length"]),
        "temperature": (st.temperature, grpo["temperature"]),
        "top_p": (st.top_p, grpo["top_p"]),
        "top_k": (st.top_k, grpo["top_k"] or 0),
        "learning_rate": (st.lr, grpo["learning_rate"]),
        "lr_scheduler_type": (st.lr_schedule, grpo["lr_scheduler_type"]),
        "warmup_steps": (st.warmup_steps, grpo["warmup_steps"]),
        "adam_beta1": (st.adam_betas[0], grpo["adam_beta1"]),
        "adam_beta2": (st.adam_betas[1], grpo["adam_beta2"]),
        "adam_epsilon": (st.adam_epsilon, grpo["adam_epsilon"]),
        "weight_decay": (st.weight_decay, grpo["weight_decay"]),
        "max_grad_norm": (st.max_grad_norm, grpo["max_grad_norm"]),
        "gradient_checkpointing": (st.gradient_checkpointing, grpo["gradient_checkpointing"]),
        "reward_weights": ([r.weight for r in st.rewards], [1.0] * len(st.rewards)),
    }
    bad = {k: v for k, v in mapped.items() if v[0] != v[1]}
    assert not bad, bad
    # what TRL does not have is off: dynamic sampling (not in TRL), overlong shaping (a separate reward)
    assert hp["dynamic_sampling"] is False and hp["overlong_cache"] == 0 and hp["advantage_clip"] is None
    assert grpo["mask_truncated_completions"] is False and grpo["top_entropy_quantile"] == 1.0


def test_linear_schedule_is_transformers_one(grpo, rl_stage):
    """lr_schedule: linear with min_lr_ratio 0 gives transformers' linear schedule step for step."""
    import torch
    from transformers import get_scheduler

    from ccrl.trainers.base import lr_lambda

    def transformers_lrs(total, warmup):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(grpo["lr_scheduler_type"], opt, num_warmup_steps=warmup, num_training_steps=total)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lr_lambda(rl_stage.lr_schedule, rl_stage.warmup_steps, 10, rl_stage.min_lr_ratio)
    assert [ours(i) for i in range(10)] == pytest.approx(transformers_lrs(10, grpo["warmup_steps"]), abs=1e-12)
    # with a warm-up, transformers starts at 0/warmup and ours at 1/warmup (no step at lr 0); after it they agree
    ours = lr_lambda("linear", 3, 10, 0.0)
    assert [ours(i) for i in range(3, 10)] == pytest.approx(transformers_lrs(10, 3)[3:], abs=1e-12)


def test_trl_dapo_preset_is_trl_loss_type_dapo(grpo):
    rec = load_recipe({"name": "p", "model": {"preset": "toy"}, "output_dir": "runs/p",
                       "stages": [{"kind": "rl", "objective": "trl_dapo", "data": {"task": "arithmetic"},
                                   "rewards": ["exact_match"]}]})
    st = rec.stage("rl")
    assert st.objective == "dapo" and rec.raw["stages"][0]["objective"] == "trl_dapo"
    hp = resolve_hparams(st, get_objective(st.objective))
    assert (hp["eps_low"], hp["eps_high"]) == (grpo["epsilon"], grpo["epsilon"])
    assert hp["aggregation"] == "token" and hp["scale"] == grpo["scale_rewards"] and hp["kl_beta"] == grpo["beta"]
    assert not hp["dynamic_sampling"] and hp["overlong_cache"] == 0
    # ccrl's own dapo is the paper's: clip-higher, dynamic sampling, overlong shaping
    paper = resolve_hparams(load_recipe(rec.raw, {"stages.rl.objective": "dapo"}).stage("rl"), get_objective("dapo"))
    assert paper["eps_high"] == 0.28 and paper["dynamic_sampling"] and paper["overlong_cache"] > 0
    # a key the stage gives wins over the preset's
    again = load_recipe(rec.raw, {"stages.rl.epsilon_high": 0.28, "stages.rl.dynamic_sampling": True}).stage("rl")
    assert again.epsilon_high == 0.28 and again.dynamic_sampling is True and again.overlong_cache == 0


def test_dpo_defaults_that_the_mapping_calls_equal():
    trl = pytest.importorskip("trl")
    dpo = _defaults(trl.DPOConfig)
    from ccrl.config.schema import PreferenceStage

    st = PreferenceStage(kind="dpo")
    assert st.beta == dpo["beta"] and [st.loss_type] == list(dpo["loss_type"])
    assert st.max_grad_norm == dpo["max_grad_norm"] and st.weight_decay == dpo["weight_decay"]
    assert st.adam_epsilon == dpo["adam_epsilon"] and st.adam_betas[0] == dpo["adam_beta1"]
    assert st.adam_betas[1] != dpo["adam_beta2"]        # documented difference: 0.95 vs 0.999


def test_mapping_doc_names_every_recipe_key_it_maps():
    doc = (ROOT / "docs" / "trl-mapping.md").read_text()
    for key in ("num_generations", "max_completion_length", "epsilon_high", "scale_rewards", "adam_betas",
                "adam_epsilon", "trl_dapo", "gradient_checkpointing", "report_to", "max_seconds", "eval_path",
                "heldout_fraction", "loss_type", "precompute_ref_log_probs"):
        assert key in doc, key
