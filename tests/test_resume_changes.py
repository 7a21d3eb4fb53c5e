"""``--resume`` knows what it resumes: the run records the recipe it started with
(``recipe.lock.yaml``); a changed model, tokenizer or data is refused (exit 2) naming the keys;
changed training settings of the interrupted stage apply from the step it continues at and are
recorded in summary.json's ``resume_history``."""

from __future__ import annotations

import json

import pytest
import yaml

from ccrl.cli import main
from ccrl.pipeline import run_recipe
from ccrl.resume import LOCK, ResumeMismatch
from ccrl.trainers.base import StageInterrupted, lr_lambda

QUIET = {"show_progress": False, "log": lambda *_: None}


def _stop_sft_at(n):
    def cb(trainer, step, metrics):
        if trainer.stage.name == "sft" and step == n:
            trainer.request_stop()

    return cb


@pytest.fixture
def interrupted(tiny_recipe, tmp_path):
    """A pretrain → sft run (sft: 8 steps, constant lr) stopped after sft step 4; returns its recipe."""
    rec = tiny_recipe()
    rec["stages"][1].update(steps=8, lr_schedule="constant")
    with pytest.raises(StageInterrupted):
        run_recipe(rec, callbacks=[_stop_sft_at(4)], **QUIET)
    return rec


def _sft_lrs(out):
    return [(r["step"], r["lr"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == "sft"]


def test_lock_records_the_resolved_recipe(interrupted, tmp_path):
    out = tmp_path / "run"
    doc = yaml.safe_load((out / LOCK).read_text())
    sft = doc["recipe"]["stages"][1]
    assert sft["name"] == "sft" and sft["lr"] == 3e-3 and sft["steps"] == 8
    assert sft["data"]["task"] == "arithmetic"          # inherited from pretrain: resolved in the lock
    assert sft["warmup_steps"] == 0                     # defaults filled in


def test_changed_lr_and_steps_apply_from_the_resumed_step_and_are_recorded(interrupted, tmp_path):
    out = tmp_path / "run"
    summary = run_recipe(interrupted, overrides=["stages.sft.lr=1e-4", "stages.sft.steps=10"], resume=True, **QUIET)
    lrs = _sft_lrs(out)
    assert [s for s, _ in lrs] == list(range(1, 11))
    assert all(lr == pytest.approx(3e-3) for s, lr in lrs if s <= 4)      # before the resume: the old lr
    assert all(lr == pytest.approx(1e-4) for s, lr in lrs if s > 4)       # after it: the new one
    assert summary["stages"][1]["steps"] == 10
    (entry,) = summary["resume_history"]
    changes = {c["key"]: c for c in entry["changes"]}
    assert set(changes) == {"stages.sft.lr", "stages.sft.steps"}
    assert changes["stages.sft.lr"]["from"] == 3e-3 and changes["stages.sft.lr"]["to"] == 1e-4
    assert changes["stages.sft.lr"]["applies_from"] == "stage sft, step 5"
    assert entry["continued_from"] == "stage sft, step 4"
    assert json.loads((out / "summary.json").read_text())["resume_history"] == summary["resume_history"]
    # recipe.yaml holds the recipe in effect and says that earlier steps used other values
    text = (out / "recipe.yaml").read_text()
    assert text.startswith("# ") and "recipe.lock.yaml" in text and "resume_history" in text
    assert yaml.safe_load(text)["stages"][1]["lr"] == 1e-4
    assert yaml.safe_load((out / LOCK).read_text())["recipe"]["stages"][1]["lr"] == 3e-3   # never rewritten


def test_new_schedule_is_the_one_planned_over_the_new_steps(tiny_recipe, tmp_path):
    rec = tiny_recipe()
    rec["stages"][1].update(steps=8, lr_schedule="cosine", min_lr_ratio=0.1)
    with pytest.raises(StageInterrupted):
        run_recipe(rec, callbacks=[_stop_sft_at(4)], **QUIET)
    run_recipe(rec, overrides=["stages.sft.steps=12"], resume=True, **QUIET)
    f = lr_lambda("cosine", 0, 12, 0.1)
    after = [lr for s, lr in _sft_lrs(tmp_path / "run") if s > 4]
    assert after == pytest.approx([3e-3 * f(i) for i in range(5, 13)])


def test_an_unchanged_resume_is_recorded_without_changes(interrupted, tmp_path):
    summary = run_recipe(interrupted, resume=True, **QUIET)
    assert summary["resume_history"][0]["changes"] == []
    assert not (tmp_path / "run" / "recipe.yaml").read_text().startswith("#")


@pytest.mark.parametrize("override, key", [
    ("model.hf_config.hidden_size=64", "model.hf_config.hidden_size"),
    ("stages.pretrain.data.options.digits=2", "stages.pretrain.data.options.digits"),
    ("tokenizer.kind=bpe", "tokenizer.kind"),
    ("seed=3", "seed"),
    ("stages.pretrain.lr=1e-4", "stages.pretrain.lr"),            # a completed stage
])
def test_identity_changes_are_refused_naming_the_keys(interrupted, tmp_path, capsys, override, key):
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(interrupted))
    before = (out / "summary.json").read_text()
    assert main(["run", str(path), "--resume", "--quiet", "--set", override]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert key in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "summary.json").read_text() == before                   # nothing recorded
    assert (out / "sft-last").is_dir()                                     # nothing lost


def test_mid_stage_structure_and_fewer_steps_than_run_are_refused(interrupted):
    with pytest.raises(ResumeMismatch, match=r"stages.sft.peft.*middle of a stage"):
        run_recipe(interrupted, overrides=["stages.sft.peft={r: 4}"], resume=True, **QUIET)
    with pytest.raises(ResumeMismatch, match=r"stages.sft.steps.*already run 4 steps"):
        run_recipe(interrupted, overrides=["stages.sft.steps=3"], resume=True, **QUIET)


def test_a_stage_added_after_the_interrupted_one_is_accepted(interrupted, tmp_path):
    rec = json.loads(json.dumps(interrupted))
    rec["stages"].append({"kind": "sft", "name": "sft2", "steps": 2, "lr": 1e-3, "batch_size": 8})
    summary = run_recipe(rec, resume=True, **QUIET)
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "sft2"]
    (entry,) = summary["resume_history"]
    assert any(c["key"] == "stages" for c in entry["changes"])
    # a second resume compares with the recipe in effect (lock + recorded changes): nothing new
    again = run_recipe(rec, resume=True, **QUIET)
    assert again["resume_history"][-1]["changes"] == []


def test_a_run_folder_without_a_lock_compares_with_its_recipe_yaml(interrupted, tmp_path):
    out = tmp_path / "run"
    (out / LOCK).unlink()                                                  # written by an older ccrl
    with pytest.raises(ResumeMismatch, match="model.hf_config.hidden_size"):
        run_recipe(interrupted, overrides=["model.hf_config.hidden_size=64"], resume=True, **QUIET)


def test_a_folder_recording_no_recipe_resumed_with_another_width_is_exit_2(tiny_recipe, tmp_path, capsys):
    rec = tiny_recipe()
    rec["stages"][0]["steps"] = 6

    def stop(trainer, step, metrics):
        if step == 2:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(rec, callbacks=[stop], **QUIET)
    out = tmp_path / "run"
    (out / LOCK).unlink()
    (out / "recipe.yaml").unlink()                                         # nothing to compare with
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    assert main(["run", str(path), "--resume", "--quiet", "--set", "model.hf_config.hidden_size=64"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "do not fit" in err and "--overwrite" in err
    assert (out / "pretrain-last" / "trainer_state.json").exists()
