"""Checkpoints: atomic save, no pickle, resume equals an uninterrupted run, NaN handling."""

from __future__ import annotations

import json

import pytest
import torch

from ccrl import checkpoint as ckpt
from ccrl.errors import CheckpointError, TrainingDiverged
from ccrl.pipeline import run_recipe
from ccrl.trainers.base import StageInterrupted


def _params(path):
    from ccrl.models import load_policy

    model, _ = load_policy(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _metric_lines(run_dir, stage):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["stage"] == stage:
            out.append({k: v for k, v in rec.items() if not k.endswith("time_s") and k not in ("tokens_per_s", "elapsed_s")})
    return out


def test_resume_equals_uninterrupted(tmp_path, tiny_recipe):
    straight = tiny_recipe(output_dir=str(tmp_path / "a"))
    straight["stages"][1]["steps"] = 20
    run_recipe(straight, show_progress=False, log=lambda *_: None)

    split = tiny_recipe(output_dir=str(tmp_path / "b"))
    split["stages"][1]["steps"] = 20

    def stop_at_10(trainer, step, metrics):
        if trainer.stage.name == "sft" and step == 10:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(split, callbacks=[stop_at_10], show_progress=False, log=lambda *_: None)
    assert (tmp_path / "b" / "sft-last" / "trainer_state.json").exists()
    assert json.loads((tmp_path / "b" / "sft-last" / "trainer_state.json").read_text())["step"] == 10
    summary = run_recipe(split, resume=True, show_progress=False, log=lambda *_: None)
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft"]
    assert not (tmp_path / "b" / "sft-last").exists()

    a, b = _params(tmp_path / "a" / "sft"), _params(tmp_path / "b" / "sft")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _metric_lines(tmp_path / "a", "sft"), _metric_lines(tmp_path / "b", "sft")
    assert len(ma) == 20 and ma == mb


def test_atomic_save_survives_crash(tmp_path, tiny_recipe, monkeypatch):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"] = rec["stages"][:1]
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    final = tmp_path / "run" / "pretrain"
    before = _params(final)
    from ccrl.models import load_policy

    model, tok = load_policy(final)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(final, model, tok, state={"step": 99})
    after = _params(final)                                   # the old checkpoint is intact
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".pretrain.tmp")]
    # a crash between the two renames leaves only the moved-aside copy: it is recovered
    final.rename(final.with_name(".pretrain.old"))
    assert ckpt.resolve(final) == final and (final / "config.json").exists()


def test_checkpoint_holds_no_pickle(tmp_path, tiny_recipe):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    files = {p.suffix for p in (tmp_path / "run" / "sft").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ".jinja", ".txt"}, files
    meta, tensors = ckpt.read_state(tmp_path / "run" / "sft")
    assert meta["complete"] and meta["step"] == 4 and "optimizer" in meta and "rng.torch" in tensors


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        ckpt.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        ckpt.resolve(tmp_path / "empty")


def test_nan_loss_stops_and_keeps_last_good(tmp_path, tiny_recipe):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"][1]["steps"] = 6
    state = {}

    def poison(trainer, step, metrics):
        if trainer.stage.name == "sft" and step == 3:
            state["good"] = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
            emb = trainer.unwrapped.get_input_embeddings()
            emb.register_forward_hook(lambda m, i, o: o * float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*saved to"):
        run_recipe(rec, callbacks=[poison], show_progress=False, log=lambda *_: None)
    last = tmp_path / "run" / "sft-last"
    meta, _ = ckpt.read_state(last)
    assert meta["step"] == 3
    saved = _params(last)
    assert all(torch.equal(saved[k], state["good"][k]) for k in saved)
    assert (tmp_path / "run" / "pretrain" / "config.json").exists()     # earlier stages untouched
