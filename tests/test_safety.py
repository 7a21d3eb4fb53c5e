"""Nothing lost, no traceback: exports never destroy a folder, run folders are locked and never
silently replaced, a failing stage keeps its last good weights, bad files are exit 2."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import rewards
from ccrl import checkpoint as ckpt
from ccrl.cli import main
from ccrl.errors import RewardError
from ccrl.pipeline import LOCK_FILE, RunFolderBusy, run_lock, run_recipe
from tests.conftest import TINY_LLAMA

QUIET = {"show_progress": False, "log": lambda *_: None}


def _pretrain(out, steps=2, **stage):
    st = {"kind": "pretrain", "data": {"task": "arithmetic", "options": {"digits": 1, "ops": "+"},
                                        "num_examples": 64, "heldout_size": 4},
          "steps": steps, "lr": 3e-3, "batch_size": 4, "seq_len": 16}
    st.update(stage)
    return {"name": "tiny", "seed": 0, "output_dir": str(out), "model": {"hf_config": copy.deepcopy(TINY_LLAMA)},
            "eval": {"max_new_tokens": 2, "batch_size": 16}, "stages": [st]}


def _yaml(tmp_path, rec, name="r.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(rec))
    return str(f)


def _params(path):
    from ccrl.models import load_policy

    model, _ = load_policy(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _err(capsys) -> str:
    """stderr of the last command, its line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def _temps(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".export" in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_recipe(_pretrain(out), **QUIET)
    return out / "pretrain"


# --------------------------------------------------------------------------- export


def test_export_refuses_a_users_folder_and_a_file(tmp_path, trained, capsys):
    src_tree = tmp_path / "project"
    (src_tree / ".git").mkdir(parents=True)
    (src_tree / "main.py").write_text("print('mine')\n")
    assert main(["export", str(trained), str(src_tree)]) == 2
    assert "not an earlier ccrl export" in _err(capsys)
    assert (src_tree / "main.py").read_text() == "print('mine')\n" and (src_tree / ".git").is_dir()

    f = tmp_path / "model.bin"
    f.write_text("keep")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(trained), str(f), *extra]) == 2
        assert "is an existing file" in _err(capsys)
    assert f.read_text() == "keep" and _temps(tmp_path) == []

    assert main(["export", str(trained), str(trained.parent)]) == 2         # holds the source
    assert "holds the source checkpoint" in _err(capsys)
    assert main(["export", str(trained), str(trained / "inner")]) == 2      # inside the source
    assert not (trained / "inner").exists()

    assert main(["export", str(trained), str(src_tree), "--overwrite"]) == 0  # asked for: replaced
    assert not (src_tree / "main.py").exists() and (src_tree / "ccrl_export.json").exists()
    assert _temps(tmp_path) == []


def test_export_replaces_an_earlier_export_atomically(tmp_path, trained, monkeypatch, capsys):
    import ccrl.export as export

    out = tmp_path / "exp"
    (tmp_path / "empty").mkdir()
    assert main(["export", str(trained), str(tmp_path / "empty")]) == 0      # an empty folder is fine
    assert main(["export", str(trained), str(out)]) == 0
    assert not (out / ckpt.STATE_JSON).exists() and export.is_export(out)
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", str(trained), str(out)]) == 0                     # an earlier export: replaced
    capsys.readouterr()

    def half_then_full(src, dst, **kw):
        os.makedirs(dst)
        (dst / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.shutil, "copytree", half_then_full)
    assert main(["export", str(trained), str(out)]) == 2
    err = _err(capsys)
    assert "No space left on device" in err and "Nothing was changed" in err
    assert (out / "model.safetensors").read_bytes() == before and _temps(tmp_path) == []
    monkeypatch.undo()

    real_rename = os.rename

    def fail_second_rename(a, b):       # the new folder cannot be renamed in: the old one goes back
        if ".export-" in str(a) and "-old-" not in str(a):
            raise OSError(errno.EXDEV, "rename failed")
        real_rename(a, b)

    monkeypatch.setattr(export.os, "rename", fail_second_rename)
    assert main(["export", str(trained), str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before and _temps(tmp_path) == []


# --------------------------------------------------------------------------- run folders


def test_lock_held_by_another_process_refuses_with_its_pid(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, json, os, sys
        fh = open({str(out / LOCK_FILE)!r}, "a+")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.write(json.dumps({{"pid": os.getpid(), "host": "here"}})); fh.flush()
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = _yaml(tmp_path, _pretrain(out))
        for extra in ([], ["--resume"]):
            assert main(["run", path, "--quiet", *extra]) == 2
            err = _err(capsys)
            assert f"pid {holder.pid}" in err and "another ccrl run" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]      # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(["run", _yaml(tmp_path, _pretrain(out)), "--quiet"]) == 0   # released when the holder ended


def test_lock_is_held_while_a_run_writes(tmp_path):
    seen = []

    def try_lock(trainer, step, metrics):
        try:
            with run_lock(tmp_path / "run"):
                seen.append("got it")
        except RunFolderBusy as e:
            seen.append(str(e))

    run_recipe(_pretrain(tmp_path / "run"), callbacks=[try_lock], **QUIET)
    assert seen and all(f"pid {os.getpid()}" in s for s in seen)
    with run_lock(tmp_path / "run"):     # released at the end
        pass


def test_new_run_over_results_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    path = _yaml(tmp_path, _pretrain(out))
    assert main(["run", path, "--quiet"]) == 0
    summary, metrics = (out / "summary.json").read_text(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["run", path, "--quiet"]) == 2
    err = _err(capsys)
    assert "earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "summary.json").read_text() == summary and (out / "metrics.jsonl").read_text() == metrics
    assert main(["check", path]) == 0 and "--resume or --overwrite" in capsys.readouterr().out
    assert main(["run", path, "--quiet", "--resume"]) == 0                   # everything done: kept
    assert (out / "metrics.jsonl").read_text() == metrics

    (out / "notes.txt").write_text("mine")
    (out / "tensorboard").mkdir()                                            # a tracker's events are results too
    (out / "tensorboard" / "events.old").write_text("old")
    assert main(["run", path, "--quiet", "--overwrite"]) == 0
    assert not (out / "tensorboard" / "events.old").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not (out / ".overwritten").exists()          # each step once, old ones gone
    assert (out / "notes.txt").read_text() == "mine"                         # only results are replaced
    with pytest.raises(SystemExit):                                          # contradictory flags
        main(["run", path, "--resume", "--overwrite"])


def test_overwrite_moves_results_aside_only_once_the_run_starts(tmp_path, capsys):
    out = tmp_path / "run"
    rec = _pretrain(out)
    assert main(["run", _yaml(tmp_path, rec), "--quiet"]) == 0
    summary = (out / "summary.json").read_text()
    bad = copy.deepcopy(rec)
    bad["stages"][0]["data"] = {"path": str(tmp_path / "missing.jsonl")}
    assert main(["run", _yaml(tmp_path, bad, "bad.yaml"), "--quiet", "--overwrite"]) == 2
    assert (out / "summary.json").read_text() == summary and (out / "pretrain" / "config.json").exists()
    start_here = copy.deepcopy(rec)
    start_here["model"] = {"checkpoint": str(out / "pretrain")}            # would move its own start aside
    assert main(["run", _yaml(tmp_path, start_here, "b.yaml"), "--quiet", "--overwrite"]) == 2
    assert "would replace" in _err(capsys) and (out / "pretrain" / "config.json").exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("a file")
    path = _yaml(tmp_path, _pretrain(f))
    assert main(["check", path]) == 2
    assert "is an existing file" in _err(capsys)
    assert main(["run", path, "--quiet"]) == 2
    assert f.read_text() == "a file"


def test_interrupted_save_temp_is_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    run_recipe(_pretrain(out), **QUIET)
    (out / ".pretrain-last.tmp-123-456").mkdir()
    (out / ".pretrain-last.tmp-123-456" / "model.safetensors").write_bytes(b"half")
    (out / ".pretrain.old").mkdir()                       # stale: pretrain/ is complete
    run_recipe(_pretrain(out), resume=True, **QUIET)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK_FILE]


# --------------------------------------------------------------------------- failures keep the weights

_REWARD = {"fail_from": None, "calls": 0}


@rewards.register("test_flaky")
def flaky(prompts, completions, **kwargs):
    """Fails from its ``fail_from``-th call on (0-based); otherwise the share of digits."""
    _REWARD["calls"] += 1
    if _REWARD["fail_from"] is not None and _REWARD["calls"] > _REWARD["fail_from"]:
        raise ValueError("the reward server is down")
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def _rl(out, steps=5):
    return {"name": "rl", "seed": 0, "output_dir": str(out), "model": {"hf_config": copy.deepcopy(TINY_LLAMA)},
            "eval": {"max_new_tokens": 3},
            "stages": [{"kind": "rl", "objective": "grpo", "steps": steps, "lr": 1e-2, "prompts_per_step": 2,
                        "group_size": 2, "max_new_tokens": 3, "warmup_steps": 0, "lr_schedule": "constant",
                        "data": {"task": "arithmetic", "options": {"digits": 1}, "num_examples": 50,
                                 "heldout_size": 4},
                        "rewards": [{"name": "test_flaky"}]}]}


def test_reward_raising_mid_rl_keeps_rl_last_and_resume_continues(tmp_path, capsys):
    _REWARD.update(fail_from=None, calls=0)
    run_recipe(_rl(tmp_path / "straight"), **QUIET)

    out = tmp_path / "run"
    path = _yaml(tmp_path, _rl(out))
    _REWARD.update(fail_from=3, calls=0)                 # steps 1-3 score, step 4's rollout fails
    assert main(["run", path, "--quiet"]) == 2
    err = _err(capsys)
    assert "reward server is down" in err and "after step 3" in err and "--resume" in err
    assert "Traceback" not in err
    assert json.loads((out / "rl-last" / ckpt.STATE_JSON).read_text())["step"] == 3
    assert not (out / "rl").exists()

    _REWARD.update(fail_from=None)                        # the reward is fixed
    assert main(["run", path, "--quiet", "--resume"]) == 0
    assert not (out / "rl-last").exists()
    a, b = _params(tmp_path / "straight" / "rl"), _params(out / "rl")
    assert all(torch.equal(a[k], b[k]) for k in a)        # as if it had never failed
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_reward_raising_in_final_scoring_keeps_the_trained_stage(tmp_path):
    out = tmp_path / "run"
    _REWARD.update(fail_from=None, calls=0)

    def break_reward_at_end(trainer, step, metrics):
        if step == trainer.stage.steps:
            _REWARD["fail_from"] = 0

    with pytest.raises(RewardError, match=r"held-out scoring failed.*final checkpoint .* is saved.*--resume"):
        run_recipe(_rl(out, steps=3), callbacks=[break_reward_at_end], **QUIET)
    meta, _ = ckpt.read_state(out / "rl")
    assert meta["complete"] and meta["step"] == 3 and not (out / "rl-last").exists()
    trained_weights = _params(out / "rl")

    _REWARD.update(fail_from=None)
    summary = run_recipe(_rl(out, steps=3), resume=True, **QUIET)
    assert summary["stages"][0]["steps"] == 3 and "reward/test_flaky" in summary["stages"][0]["metrics"]
    after = _params(out / "rl")
    assert all(torch.equal(trained_weights[k], after[k]) for k in after)   # scored, not trained again
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_any_exception_keeps_last_good_and_says_so(tmp_path):
    out = tmp_path / "run"

    def bug(trainer, step, metrics):
        if step == 2:
            raise RuntimeError("a bug in a callback")

    with pytest.raises(RuntimeError, match="a bug in a callback") as info:
        run_recipe(_pretrain(out, steps=4), callbacks=[bug], **QUIET)
    assert any("after step 2" in n and "--resume" in n for n in info.value.__notes__)
    assert json.loads((out / "pretrain-last" / ckpt.STATE_JSON).read_text())["step"] == 2


def test_sigterm_writes_a_checkpoint_and_exits_130(tmp_path, capsys, monkeypatch):
    import ccrl.pipeline as pipeline

    def kill_at_2(trainer, step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    real = pipeline.run_recipe
    monkeypatch.setattr(pipeline, "run_recipe", lambda *a, **k: real(*a, callbacks=[kill_at_2], **k))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", _yaml(tmp_path, _pretrain(tmp_path / "run", steps=4)), "--quiet"]) == 130
    assert "--resume" in _err(capsys)
    assert json.loads((tmp_path / "run" / "pretrain-last" / ckpt.STATE_JSON).read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("where", ["final", "periodic"])
def test_disk_full_during_a_save_is_exit_2_with_no_temp_left(tmp_path, capsys, monkeypatch, where):
    from safetensors import SafetensorError

    real = ckpt.save_model

    def full(model, tmp):
        if tmp.name.startswith(".pretrain.tmp" if where == "final" else ".pretrain-last.tmp"):
            (tmp / "model.safetensors").write_bytes(b"half-written")
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        real(model, tmp)

    monkeypatch.setattr(ckpt, "save_model", full)
    out = tmp_path / "run"
    assert main(["run", _yaml(tmp_path, _pretrain(out, steps=4, save_every=2)), "--quiet"]) == 2
    err = _err(capsys)
    assert "No space left on device" in err and "Traceback" not in err
    if where == "final":
        assert "final checkpoint could not be saved" in err and "(after step 4) were saved to" in err
    else:
        assert "no checkpoint of this stage was written yet" in err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "pretrain").exists()


# --------------------------------------------------------------------------- bad files and arguments


def test_truncated_or_missing_weights_are_exit_2_naming_the_file(tmp_path, trained, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["eval", str(bad), "--task", "arithmetic", "--n", "2"]) == 2
    err = _err(capsys)
    assert str(f) in err and "truncated or corrupt" in err
    rec = _pretrain(tmp_path / "run")
    rec["model"] = {"checkpoint": str(bad)}
    assert main(["run", _yaml(tmp_path, rec), "--quiet"]) == 2
    assert str(f) in _err(capsys)
    f.unlink()
    assert main(["export", str(bad), str(tmp_path / "exp"), "--merge"]) == 2
    err = _err(capsys)
    assert str(f) in err and "missing" in err and not (tmp_path / "exp").exists()


def test_eval_needs_tokens_to_generate(trained, capsys):
    for n in ("0", "-3"):
        assert main(["eval", str(trained), "--task", "arithmetic", "--max-new-tokens", n]) == 2
        assert "--max-new-tokens" in _err(capsys)


def test_error_paragraphs_never_split_a_path(tmp_path, capsys):
    """The CLI wraps its one-paragraph errors at 100 columns without breaking at a hyphen or inside a
    word, so a path in the message can be copied as it is."""
    from ccrl.cli import main

    recipe = tmp_path / ("a-long-folder-name-with-many-hyphens-" * 3) / "my-recipe-file.yaml"
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err
