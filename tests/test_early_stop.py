"""``early_stop``: a stage ends at the first check whose greedy accuracy on its own training
prompts reaches the threshold; the check is logged, resumable, and never looks at held-out prompts."""

from __future__ import annotations

import json

import pytest
import yaml

from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.pipeline import run_recipe
from ccrl.trainers.base import StageInterrupted, Trainer


def _sft_lines(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "sft"]


def _scripted(monkeypatch, values):
    """Replace the decoded accuracy by a script: the n-th check returns values[n]."""
    calls = []

    def fake(self):
        calls.append(self.step)
        return values[min(len(calls), len(values)) - 1]

    monkeypatch.setattr(Trainer, "early_stop_accuracy", fake)
    return calls


def test_stops_at_the_first_check_that_reaches_the_threshold(tmp_path, tiny_recipe, monkeypatch):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"][1].update(steps=30, early_stop={"accuracy": 0.5, "every": 5, "min_steps": 10})
    calls = _scripted(monkeypatch, [0.1, 0.49, 0.5, 0.9])
    logs = []
    summary = run_recipe(rec, show_progress=False, log=logs.append)
    assert calls == [10, 15, 20]                                  # min_steps 10, then every 5; stops at 0.5 >= 0.5
    sft = summary["stages"][1]
    assert sft["steps"] == 20 and summary["stages"][0]["steps"] == 4
    lines = _sft_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert [(r["step"], r["early_stop/accuracy"]) for r in lines if "early_stop/accuracy" in r] == [
        (10, 0.1), (15, 0.49), (20, 0.5)]
    state = json.loads((tmp_path / "run" / "sft" / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["complete"] is True
    assert "heldout_accuracy" in sft["metrics"]                   # scored on held-out like any finished stage
    assert any("early stop at step 20 of 30" in m and ">= 0.5" in m for m in logs), logs
    # a finished (early-stopped) stage is skipped on --resume
    again = run_recipe(rec, resume=True, show_progress=False, log=logs.append)
    assert again["stages"][1]["steps"] == 20 and len(_sft_lines(tmp_path / "run")) == 20


def test_below_the_threshold_the_stage_runs_all_its_steps(tmp_path, tiny_recipe):
    """Unpatched: the logged value is the greedy accuracy of the weights at that step, on a fixed
    sample of distinct training prompts that shares nothing with the held-out prompts."""
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"][1].update(steps=6, early_stop={"accuracy": 1.0, "every": 3, "prompts": 7})
    seen = {}

    def check(trainer, step, metrics):
        if trainer.stage.name != "sft":
            return
        sample = trainer.early_stop_sample
        seen.setdefault("samples", []).append([e.prompt for e in sample])
        if "early_stop/accuracy" in metrics:
            from ccrl.evaluation import evaluate_policy

            ctx = trainer.ctx
            again = evaluate_policy(trainer.sampling_model, ctx, sample)["heldout_accuracy"]
            seen.setdefault("acc", []).append((step, metrics["early_stop/accuracy"], again))
            seen["heldout"] = {e.prompt for e in ctx.heldout}
            seen["train"] = {e.prompt for e in ctx.train_examples}

    summary = run_recipe(rec, callbacks=[check], show_progress=False, log=lambda *_: None)
    assert summary["stages"][1]["steps"] == 6
    assert [(s, a) for s, a, _ in seen["acc"]] == [(3, seen["acc"][0][2])]   # step 6 is the end: no check
    prompts = seen["samples"][0]
    assert len(prompts) == len(set(prompts)) == 7
    assert all(p == prompts for p in seen["samples"])             # the same sample at every step
    assert set(prompts) <= seen["train"] and not set(prompts) & seen["heldout"]


def test_interrupted_at_the_stopping_step_resumes_as_finished(tmp_path, tiny_recipe, monkeypatch):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"][1].update(steps=30, early_stop={"accuracy": 0.5, "every": 5})
    _scripted(monkeypatch, [0.0, 0.8])

    def interrupt_at_10(trainer, step, metrics):
        if trainer.stage.name == "sft" and step == 10:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(rec, callbacks=[interrupt_at_10], show_progress=False, log=lambda *_: None)
    assert json.loads((tmp_path / "run" / "sft-last" / "trainer_state.json").read_text())["step"] == 10
    summary = run_recipe(rec, resume=True, show_progress=False, log=lambda *_: None)
    assert summary["stages"][1]["steps"] == 10                    # the check at step 10 is repeated: still over
    assert [r["step"] for r in _sft_lines(tmp_path / "run")] == list(range(1, 11))


def test_examples_without_answers_are_refused_before_training(tmp_path, tiny_recipe):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n" for a in range(10) for b in range(10)))
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"] = [{**rec["stages"][0], "data": {"path": str(data)}, "early_stop": {"accuracy": 0.5}}]
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.early_stop: needs training examples with answers"):
        run_recipe(rec, show_progress=False, log=lambda *_: None)
    assert not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.parametrize("early_stop, words", [
    ({"accuracy": 0.5, "evry": 5}, ["stages[1].early_stop.evry", "did you mean 'every'"]),
    ({"accuracy": 1.5}, ["stages[1].early_stop", "accuracy", "(0.0, 1.0]"]),
    ({"accuracy": 0.5, "every": 0}, ["stages[1].early_stop", "every"]),
    ("yes", ["stages[1].early_stop", "mapping"]),
])
def test_bad_early_stop_is_a_recipe_error(tmp_path, tiny_recipe, early_stop, words):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"][1]["early_stop"] = early_stop
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
