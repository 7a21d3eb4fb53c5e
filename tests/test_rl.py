"""Online RL trainer: smoke (parameters change, reward rises), dynamic sampling, micro-batch
invariance, routing replay, resume in the middle of the stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rewards
from ccrl.pipeline import run_recipe
from ccrl.trainers.base import StageInterrupted
from tests.conftest import TINY_LLAMA


@rewards.register("test_digit_fraction")
def digit_fraction(prompts, completions, **kwargs):
    """Share of digit characters in the completion (a trivially learnable reward)."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


@rewards.register("test_constant_half")
def constant_half(prompts, completions, **kwargs):
    """1 for the first half of the prompts of a batch, 0 after: every group has zero variance."""
    return [1.0 if i < len(prompts) // 2 else 0.0 for i in range(len(prompts))]


def rl_recipe(tmp_path, name="rl", model=None, **stage):
    st = {"kind": "rl", "objective": "grpo", "data": {"task": "arithmetic", "options": {"digits": 1},
                                                      "num_examples": 100, "heldout_size": 8},
          "steps": 3, "lr": 1e-2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4,
          "rewards": [{"name": "test_digit_fraction"}], "warmup_steps": 0, "lr_schedule": "constant"}
    st.update(stage)
    return {"name": name, "seed": 0, "output_dir": str(tmp_path / name),
            "model": model or {"hf_config": copy.deepcopy(TINY_LLAMA)},
            "eval": {"max_new_tokens": 4}, "stages": [st]}


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_params(run_dir, stage="rl"):
    from ccrl.models import load_policy

    m, _ = load_policy(run_dir / stage)
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_smoke_all_params_change_and_reward_rises(tmp_path):
    rec = rl_recipe(tmp_path, steps=25, lr=2e-2, prompts_per_step=8, group_size=8, max_new_tokens=6)
    from ccrl.config import load_recipe
    from ccrl.data import default_tokenizer
    from ccrl.models import build_model

    r = load_recipe(rec)
    init = {k: v.clone() for k, v in build_model(r.model, default_tokenizer(), seed=0).state_dict().items()}
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    final = _final_params(tmp_path / "rl")
    unchanged = [k for k in final if torch.equal(final[k], init[k])]
    assert not unchanged, unchanged
    rs = [x["reward"] for x in _lines(tmp_path / "rl")]
    assert sum(rs[-5:]) / 5 > sum(rs[:5]) / 5 + 0.15, rs
    line = _lines(tmp_path / "rl")[0]
    for key in ("loss", "reward", "reward/test_digit_fraction", "kl", "approx_kl", "clip_frac", "entropy",
                "completion_tokens", "tokens_per_s", "step_time_s", "accuracy"):
        assert key in line, key


def test_dynamic_sampling_drops_zero_variance_groups(tmp_path):
    rec = rl_recipe(tmp_path, steps=1, objective="dapo", max_resample_tries=3, overlong_cache=0,
                    rewards=[{"name": "test_constant_half"}, {"name": "test_digit_fraction", "weight": 0.0}])
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    line = _lines(tmp_path / "rl")[0]
    # every group is constant: all three rounds are drawn and nothing informative is kept
    assert line["dynamic_sampling/rounds"] == 3 and line["dynamic_sampling/kept_frac"] == 0.0
    rec = rl_recipe(tmp_path, name="rl2", steps=1, objective="dapo", max_resample_tries=3)
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    line = _lines(tmp_path / "rl2")[0]
    assert line["frac_reward_zero_std"] == 0.0 and line["dynamic_sampling/rounds"] >= 1


@rewards.register("test_sample_index_cost", cost=True)
def sample_index_cost(prompts, completions, **kwargs):
    """A cost that differs between every two completions (as ICE does by a token)."""
    return [0.01 * i for i in range(len(completions))]


def test_dynamic_sampling_ignores_costs_by_default(tmp_path):
    terms = [{"name": "test_constant_half"}, {"name": "test_sample_index_cost", "weight": 1.0}]
    # default signal: what the completions earned; the cost differs in every group but earns nothing
    rec = rl_recipe(tmp_path, steps=1, objective="dapo", max_resample_tries=3, overlong_cache=0, rewards=terms)
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    line = _lines(tmp_path / "rl")[0]
    assert line["dynamic_sampling/rounds"] == 3 and line["dynamic_sampling/kept_frac"] == 0.0
    # the whole V_Ω: the cost makes every group look informative, one round keeps them all
    rec = rl_recipe(tmp_path, name="rl_value", steps=1, objective="dapo", max_resample_tries=3, overlong_cache=0,
                    rewards=terms, dynamic_sampling_signal="value")
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    line = _lines(tmp_path / "rl_value")[0]
    assert line["dynamic_sampling/rounds"] == 1 and line["dynamic_sampling/kept_frac"] == 1.0


def test_reward_set_earned_leaves_out_costs_and_extra_terms():
    from ccrl.config import RewardSpec
    from ccrl.scoring import RewardSet

    rs = RewardSet([RewardSpec("exact_match", 2.0), RewardSpec("ice", 0.5), RewardSpec("format", 0.5)])
    per = {"exact_match": torch.tensor([1.0, 0.0, float("nan")]), "ice": torch.tensor([0.3, 0.1, 0.2]),
           "format": torch.tensor([0.0, 1.0, 1.0]), "overlong": torch.tensor([-1.0, 0.0, 0.0])}
    # 2·R + 0.5·F; ICE (a cost) and the overlong entry (not a term of the set) are left out; NaN skipped
    assert rs.earned(per).tolist() == [2.0, 0.5, 0.5]


def test_informative_group_filter_unit():
    from ccrl.objectives import informative_groups

    v = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert informative_groups(v, 2).tolist() == [False, True, False]


@pytest.mark.parametrize("objective", ["grpo", "dapo", "dr_grpo"])
def test_micro_batched_step_equals_whole_batch(tmp_path, objective):
    """One step with micro-batches of 3 rows gives the whole batch's loss, gradient norm and weights.
    AdamW ε = 1e-3: the first update lr·g/(|g| + ε) then follows the gradient's size, so a wrong
    scale shows in the weights; with torch's 1e-8 an entry whose gradient is near ε moves by up to
    1e5 times its rounding, which differs between CPUs' matmul kernels."""
    a = rl_recipe(tmp_path, name=f"a{objective}", steps=1, objective=objective, lr=1e-3, adam_epsilon=1e-3)
    b = rl_recipe(tmp_path, name=f"b{objective}", steps=1, objective=objective, lr=1e-3, adam_epsilon=1e-3,
                  micro_batch_size=3)
    run_recipe(a, show_progress=False, log=lambda *_: None)
    run_recipe(b, show_progress=False, log=lambda *_: None)
    pa, pb = _final_params(tmp_path / f"a{objective}"), _final_params(tmp_path / f"b{objective}")
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-6, rtol=0), k
    la, lb = _lines(tmp_path / f"a{objective}")[0], _lines(tmp_path / f"b{objective}")[0]
    assert abs(la["loss"] - lb["loss"]) < 1e-6
    assert la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-5) and la["grad_norm"] > 1e-3


def _run_interrupted_then_resumed(tmp_path, name: str, stop_at: int, **stage) -> None:
    """Run ``rl_recipe(name, **stage)``, interrupted after step ``stop_at``, then ``--resume`` it."""
    b = rl_recipe(tmp_path, name=name, **stage)

    def stop(trainer, step, metrics):
        if step == stop_at:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(b, callbacks=[stop], show_progress=False, log=lambda *_: None)
    run_recipe(b, resume=True, show_progress=False, log=lambda *_: None)


@pytest.mark.parametrize("guard", [None, 0.001])
def test_resume_mid_rl_equals_uninterrupted(tmp_path, guard):
    """Also with kl_guard, whose learning-rate scale is part of the trainer state."""
    stage = dict(steps=6, log_completions_every=2) if guard is None else dict(steps=4, lr=0.2, kl_guard=guard)
    run_recipe(rl_recipe(tmp_path, name="a", **stage), show_progress=False, log=lambda *_: None)
    _run_interrupted_then_resumed(tmp_path, "b", 3 if guard is None else 2, **stage)
    pa, pb = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda ls: [{k: v for k, v in x.items() if "time" not in k and k not in ("tokens_per_s", "elapsed_s")}
                       for x in ls]
    assert strip(_lines(tmp_path / "a")) == strip(_lines(tmp_path / "b"))
    if guard is None:
        table = lambda run: (tmp_path / run / "completions" / "rl.jsonl").read_text()
        assert table("a") == table("b") and table("a").count("\n") == 3 * 16          # steps 2, 4, 6
    else:
        assert len({r["lr_scale"] for r in _lines(tmp_path / "a")}) > 1     # the scale moved, and resumed alike


@rewards.register("test_ids_logger", override=True)
def ids_logger(prompts, completions, completion_ids, answer_ids, eos_token_id, log_extra, **kwargs):
    """A user reward that writes two extra columns: what each completion generated and what
    ``exact_match`` with ``match: tokens`` wants (the answer's ids, then EOS). Scores nothing."""
    log_extra("ids", completion_ids)
    log_extra("want", [a + [eos_token_id] for a in answer_ids])
    return [None] * len(completions)


def test_exact_match_tokens_and_log_extra_through_an_rl_stage(tmp_path):
    rec = rl_recipe(tmp_path, steps=4, log_completions_every=2,
                    rewards=[{"name": "exact_match", "match": "tokens"}, {"name": "test_ids_logger"}])
    summary = run_recipe(rec, show_progress=False, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "rl" / "completions" / "rl.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 16 + [4] * 16          # prompts_per_step 4 × group_size 4, steps 2 and 4
    for r in rows:
        assert set(r) == {"step", "prompt", "completion", "exact_match", "test_ids_logger", "value", "advantage", "ids", "want"}
        assert r["exact_match"] == float(r["ids"] == r["want"]) and r["test_ids_logger"] is None
    assert "reward/exact_match" in summary["stages"][0]["metrics"]   # held-out scoring passes answer_ids too


def test_log_extra_is_dropped_when_log_completions_is_off(tmp_path):
    rec = rl_recipe(tmp_path, steps=1, rewards=[{"name": "test_digit_fraction"}, {"name": "test_ids_logger"}])
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    assert not (tmp_path / "rl" / "completions").exists()
    assert _lines(tmp_path / "rl")[0]["step"] == 1


def test_log_extra_checks_its_columns():
    from ccrl.config.schema import RewardSpec
    from ccrl.errors import RewardError
    from ccrl.scoring import RewardSet

    def short(prompts, completions, log_extra, **kwargs):
        log_extra("note", ["a"])
        return [1.0] * len(completions)

    def clash(prompts, completions, log_extra, **kwargs):
        log_extra("advantage", [0.0] * len(completions))
        return [1.0] * len(completions)

    def chunks(prompts, completions, log_extra, **kwargs):    # appended, as TRL's log_extra extends
        log_extra("note", ["a"])
        log_extra("note", ["b"])
        return [1.0] * len(completions)

    rewards.register("test_log_extra_short", override=True)(short)
    rewards.register("test_log_extra_clash", override=True)(clash)
    rewards.register("test_log_extra_chunks", override=True)(chunks)
    with pytest.raises(RewardError, match="column 'note' got 1 values for 2 completions"):
        RewardSet([RewardSpec("test_log_extra_short")], keep_extra=True).score(["q", "q"], ["a", "b"])
    with pytest.raises(RewardError, match="column 'advantage' is one the completions table already has"):
        RewardSet([RewardSpec("test_log_extra_clash")]).score(["q", "q"], ["a", "b"])
    assert RewardSet([RewardSpec("test_log_extra_chunks")], keep_extra=True).score(["q", "q"], ["a", "b"]).extra \
        == {"note": ["a", "b"]}
    assert RewardSet([RewardSpec("test_log_extra_short")]).score(["q", "q"], ["a", "b"]).extra == {}   # off: dropped


def test_kl_guard_scale_rule():
    from ccrl.trainers.rl import kl_guard_scale

    assert kl_guard_scale(1.0, 0.04, 0.01) == pytest.approx(0.5)        # √(0.01/0.04)
    assert kl_guard_scale(0.5, 0.01, 0.01) == pytest.approx(0.5)        # on target: unchanged
    assert kl_guard_scale(0.5, 0.0025, 0.01) == pytest.approx(0.75)     # √4 = 2, clamped to 1.5
    assert kl_guard_scale(0.8, 0.0, 0.01) == pytest.approx(1.0)         # never above the schedule
    assert kl_guard_scale(1.0, 100.0, 0.01) == pytest.approx(0.1)       # at most 10× down per update


def test_kl_guard_measures_the_update_and_slows_a_too_large_rate(tmp_path):
    """At lr 0.2 the tiny Llama's updates move the policy by far more than 0.001 nats a token: the
    guard measures that, lowers the rate (the logged lr is the next update's: scheduled × scale) and
    the KL of the later updates falls towards the target. At lr 1e-9 the update's KL is ~0."""
    big = rl_recipe(tmp_path, name="big", steps=6, lr=0.2, kl_guard=0.001)
    run_recipe(big, show_progress=False, log=lambda *_: None)
    rows = _lines(tmp_path / "big")
    kls, scales = [r["update_kl"] for r in rows], [r["lr_scale"] for r in rows]
    # the first update ran at 0.1 × 0.2; its KL was far above the target, so the scale fell again
    assert kls[0] > 0.01 and scales[0] == pytest.approx(0.01), (kls, scales)
    assert all(r["lr"] == pytest.approx(0.2 * r["lr_scale"]) for r in rows)
    assert min(kls[2:]) < kls[0] / 5, kls
    small = rl_recipe(tmp_path, name="small", steps=2, lr=1e-9, kl_guard=0.001)
    run_recipe(small, show_progress=False, log=lambda *_: None)
    rows = _lines(tmp_path / "small")
    assert all(0.0 <= r["update_kl"] < 1e-9 for r in rows)
    assert [r["lr_scale"] for r in rows] == pytest.approx([0.15, 0.225])   # from 0.1, × 1.5 per quiet update


def test_kl_guard_off_logs_nothing_and_leaves_the_rate(tmp_path):
    run_recipe(rl_recipe(tmp_path, name="off", steps=2), show_progress=False, log=lambda *_: None)
    for r in _lines(tmp_path / "off"):
        assert "update_kl" not in r and r["lr"] == pytest.approx(1e-2)

