"""Experiment tracking (report_to), wall-clock budgets (max_seconds) and the callbacks API: a stage
ended by a budget or a callback finishes like a full one (final checkpoint, held-out scores, a
summary entry with the steps run), and the next stage runs."""

from __future__ import annotations

import copy
import json

import pytest

import ccrl
from ccrl.errors import RecipeError
from tests.conftest import TINY_LLAMA

QUIET = {"show_progress": False}


def _rl_stage(**kw):
    st = {"kind": "rl", "objective": "grpo", "data": {"task": "arithmetic", "options": {"digits": 1},
                                                      "num_examples": 50, "heldout_size": 4},
          "steps": 3, "lr": 1e-2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3,
          "rewards": [{"name": "exact_match"}, {"name": "format", "pattern": r"\d+"}], "lr_schedule": "constant"}
    st.update(kw)
    return st


def _sft_stage(**kw):
    st = {"kind": "sft", "data": {"task": "arithmetic", "options": {"digits": 1, "ops": "+"},
                                  "num_examples": 64, "heldout_size": 4},
          "steps": 4, "lr": 3e-3, "batch_size": 4}
    st.update(kw)
    return st


def _recipe(out, *stages, **top):
    rec = {"name": "tiny", "seed": 0, "output_dir": str(out), "model": {"hf_config": copy.deepcopy(TINY_LLAMA)},
           "eval": {"max_new_tokens": 3, "batch_size": 16}, "stages": list(stages)}
    rec.update(top)
    return rec


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- report_to


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = ccrl.run_recipe(_recipe(out, _sft_stage(steps=2), _rl_stage(steps=3), report_to=["tensorboard"]),
                              show_progress=False)
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    lines = _lines(out)
    rl = [r for r in lines if r["stage"] == "rl"]
    for key in ("loss", "reward", "kl", "completion_tokens", "step_time_s", "reward/exact_match"):
        if key not in rl[0]:
            continue
        tag = f"rl/{key}"
        assert tag in tags, (tag, sorted(tags))
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [2 + r["step"] for r in rl]     # after the sft stage's 2 steps
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rl], rel=1e-6, abs=1e-6)
    assert [s.step for s in acc.Scalars("sft/loss")] == [1, 2]
    assert "rl/loss" in tags and "rl/reward" in tags
    held = summary["stages"][1]["metrics"]
    assert acc.Scalars("rl/eval/heldout_accuracy")[-1].value == pytest.approx(held["heldout_accuracy"])
    assert acc.Scalars("rl/eval/heldout_accuracy")[-1].step == 5


def test_report_to_none_and_a_missing_tracker_package(tmp_path, monkeypatch):
    from ccrl.config import load_recipe

    assert load_recipe(_recipe(tmp_path / "a", _sft_stage(), report_to="none")).report_to == []
    assert load_recipe(_recipe(tmp_path / "a", _sft_stage(), report_to="tensorboard")).report_to == ["tensorboard"]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match=r"report_to: 'wandb' needs the wandb package.*pip install wandb"):
        load_recipe(_recipe(tmp_path / "a", _sft_stage(), report_to=["wandb"]))
    with pytest.raises(RecipeError, match="report_to"):
        load_recipe(_recipe(tmp_path / "a", _sft_stage(), report_to=["tensorbord"]))


def test_check_exits_2_when_a_tracker_is_not_installed(tmp_path, monkeypatch, capsys):
    import importlib.util

    import yaml

    from ccrl.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(_recipe(tmp_path / "run", _sft_stage(), report_to=["mlflow"])))
    assert main(["check", str(f)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "mlflow" in err and "Traceback" not in err


# --------------------------------------------------------------------------- max_seconds


def test_max_seconds_ends_the_stage_normally_and_the_next_stage_runs(tmp_path, monkeypatch):
    import types

    import ccrl.trainers.base as base

    clock = {"t": 0.0}      # the trainer's clock: every optimizer update takes 10 "seconds"
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    real_step = base.Trainer.optimizer_step

    def slow_step(self):
        clock["t"] += 10.0
        return real_step(self)

    monkeypatch.setattr(base.Trainer, "optimizer_step", slow_step)
    out = tmp_path / "run"
    rec = _recipe(out, _sft_stage(steps=50, max_seconds=25), _rl_stage(steps=2))
    summary = ccrl.run_recipe(rec, **QUIET)
    sft, rl = summary["stages"]
    assert sft["steps"] == 3 and sft["stopped_by"] == "max_seconds"        # 30 s >= 25 s after step 3
    assert "heldout_accuracy" in sft["metrics"]
    assert rl["steps"] == 2 and rl["stopped_by"] is None
    state = json.loads((out / "sft" / "trainer_state.json").read_text())
    assert state["complete"] and state["step"] == 3 and state["stopped_by"] == "max_seconds"
    assert not (out / "sft-last").exists()
    assert [r["step"] for r in _lines(out) if r["stage"] == "sft"] == [1, 2, 3]


# --------------------------------------------------------------------------- callbacks


class Recorder(ccrl.Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_stage_start(self, state):
        self.events.append(("start", state.stage, state.step, state.steps))

    def on_step_end(self, state, metrics):
        self.events.append(("step", state.stage, state.step, "loss" in metrics))
        return self.stop_at is not None and state.stage == self.stop_at[0] and state.step == self.stop_at[1]

    def on_evaluate(self, state, metrics):
        self.events.append(("evaluate", state.stage, state.step, sorted(metrics)))

    def on_stage_end(self, state, metrics):
        self.events.append(("end", state.stage, state.step, state.stopped_by, "heldout_accuracy" in metrics))




def test_callback_stop_ends_the_stage_normally(tmp_path):
    out = tmp_path / "run"
    cb = Recorder(stop_at=("sft", 2))
    summary = ccrl.run_recipe(_recipe(out, _sft_stage(steps=6, eval_every=1), _rl_stage(steps=2)),
                              callbacks=[cb], **QUIET)
    sft, rl = summary["stages"]
    assert sft["steps"] == 2 and sft["stopped_by"] == "callback" and "heldout_accuracy" in sft["metrics"]
    assert rl["steps"] == 2 and rl["stopped_by"] is None
    assert (out / "sft" / "config.json").exists() and not (out / "sft-last").exists()
    assert json.loads((out / "sft" / "trainer_state.json").read_text())["complete"]
    sft_events = [e for e in cb.events if e[1] == "sft"]
    assert sft_events[0] == ("start", "sft", 0, 6)
    assert [e[0] for e in sft_events] == ["start", "evaluate", "step", "evaluate", "step", "evaluate", "end"]
    assert sft_events[-1] == ("end", "sft", 2, "callback", True)
    assert ("start", "rl", 0, 2) in cb.events and cb.events[-1][:4] == ("end", "rl", 2, None)
    assert [r["step"] for r in _lines(out) if r["stage"] == "sft"] == [1, 2]


def test_a_stop_from_on_evaluate_and_bad_callbacks(tmp_path):
    class StopOnEval(ccrl.Callback):
        def on_evaluate(self, state, metrics):
            return state.step >= 2

    summary = ccrl.run_recipe(_recipe(tmp_path / "a", _sft_stage(steps=6, eval_every=2, log_every=5)),
                              callbacks=[StopOnEval()], **QUIET)
    assert summary["stages"][0]["steps"] == 2 and summary["stages"][0]["stopped_by"] == "callback"
    assert [r["step"] for r in _lines(tmp_path / "a")] == [2]        # the last step is logged though log_every=5
    with pytest.raises(TypeError, match="ccrl.Callback"):
        ccrl.run_recipe(_recipe(tmp_path / "b", _sft_stage()), callbacks=[42], **QUIET)
