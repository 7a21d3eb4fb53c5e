"""Bad input is exit 2 and one paragraph, as early as possible: NaN/inf anywhere in a recipe,
out-of-range numbers, files that are not UTF-8, model configs transformers refuses, prompts
longer than the model's context, decoding settings; a failed write at run time says what,
where and what was kept."""

from __future__ import annotations

import copy
import errno
import json
import re

import pytest
import yaml

from ccrl.cli import main
from ccrl.errors import DataError
from tests.conftest import TINY_LLAMA


def _recipe(tmp_path, **top):
    rec = {"name": "bad", "seed": 0, "output_dir": str(tmp_path / "run"),
           "model": {"hf_config": copy.deepcopy(TINY_LLAMA)}, "eval": {"max_new_tokens": 4, "batch_size": 16},
           "stages": [{"kind": "sft", "data": {"task": "arithmetic", "options": {"digits": 1, "ops": "+"},
                                               "num_examples": 32, "heldout_size": 4},
                       "steps": 2, "lr": 3e-3, "batch_size": 4}]}
    rec.update(top)
    return rec


def _write(tmp_path, rec, name="r.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(rec))
    return str(f)


def _check(capsys, path, *sets) -> tuple[int, str]:
    args = ["check", path]
    for s in sets:
        args += ["--set", s]
    rc = main(args)
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    return rc, err


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("override, key", [
    ("stages.sft.lr=.nan", "stages[0].lr"),
    ("stages.sft.lr=nan", "stages[0].lr"),
    ("stages.sft.max_grad_norm=.inf", "stages[0].max_grad_norm"),
    ("rewards=[{name: exact_match, weight: .nan}]", "rewards[0].weight"),
    ("stages.sft.data.options.digits=.nan", "stages[0].data.options.digits"),
    ("model.hf_config.rms_norm_eps=.inf", "model.hf_config.rms_norm_eps"),
])
def test_nan_and_inf_are_refused_anywhere(tmp_path, capsys, override, key):
    rc, err = _check(capsys, _write(tmp_path, _recipe(tmp_path)), override)
    assert rc == 2 and key in err and "finite number" in err


@pytest.mark.parametrize("override, key", [
    ("threads=-4", "threads"),
    ("stages.sft.lr=0", "lr"),
    ("stages.sft.lr=-1e-3", "lr"),
    ("stages.sft.min_lr_ratio=1.5", "min_lr_ratio"),
    ("stages.sft.max_grad_norm=-1", "max_grad_norm"),
    ("tokenizer.vocab_size=0", "vocab_size"),
    ("eval.max_new_tokens=0", "max_new_tokens"),
])
def test_numbers_out_of_range_are_refused(tmp_path, capsys, override, key):
    rc, err = _check(capsys, _write(tmp_path, _recipe(tmp_path)), override)
    assert rc == 2 and key in err and "expected" in err


@pytest.mark.parametrize("setting, key", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"epsilon": -0.2}, "epsilon"),
    ({"overlong_cache": 9}, "overlong_cache"),
])
def test_decoding_and_clip_settings_are_checked(tmp_path, capsys, setting, key):
    rl = {"kind": "rl", "objective": "grpo", "steps": 1, "prompts_per_step": 2, "group_size": 2,
          "max_new_tokens": 4, "rewards": [{"name": "exact_match"}], **setting}
    rec = _recipe(tmp_path)
    rec["stages"].append(rl)
    rc, err = _check(capsys, _write(tmp_path, rec))
    assert rc == 2 and key in err


# --------------------------------------------------------------------------- files


def test_a_recipe_that_is_not_utf8_names_the_file_and_offset(tmp_path, capsys):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(yaml.safe_dump(_recipe(tmp_path)).encode() + "# caf\xe9\n".encode("latin-1"))
    rc, err = _check(capsys, str(f))
    assert rc == 2 and f.name in err and "not UTF-8" in err and "0xe9" in err
    offset = f.read_bytes().index(b"\xe9")
    assert f"offset {offset}" in err


def test_a_base_recipe_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "base.yaml").write_bytes(b"seed: 0\nname: caf\xe9\n")
    rc, err = _check(capsys, _write(tmp_path, {"base": "base.yaml"}))
    assert rc == 2 and "base.yaml" in err and "offset 17" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_data_file_that_is_not_utf8_is_refused_at_check_time(tmp_path, capsys, suffix):
    f = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        f.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "3"}\n')
    else:
        f.write_bytes(b"prompt,answer\n1+1=,2\ncaf\xe9,3\n")
    rec = _recipe(tmp_path)
    rec["stages"][0]["data"] = {"path": str(f)}
    rc, err = _check(capsys, _write(tmp_path, rec))
    assert rc == 2 and f.name in err and "stages[0] (sft).data.path" in err and "not UTF-8" in err
    line = 2 if suffix == ".jsonl" else 3              # a CSV's header is line 1
    assert f"offset {f.read_bytes().index(0xe9)} (line {line})" in err
    from ccrl.data import load_rows

    with pytest.raises(DataError, match="not UTF-8"):      # and when the rows are loaded
        load_rows(f, "sft")


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("hf", [
    {"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4},
    {"model_type": "gpt2", "n_embd": 30, "n_head": 4, "n_layer": 1},
])
def test_an_hf_config_transformers_refuses_is_one_paragraph_at_check_time(tmp_path, capsys, hf):
    rec = _recipe(tmp_path, model={"hf_config": hf})
    rc, err = _check(capsys, _write(tmp_path, rec))
    assert rc == 2 and "model.hf_config" in err and "cannot build" in err
    assert not (tmp_path / "run").exists()


def test_lengths_that_cannot_fit_the_context_are_refused_at_check_time(tmp_path, capsys):
    rec = _recipe(tmp_path)
    rec["stages"].insert(0, {"kind": "pretrain", "steps": 1, "batch_size": 4, "seq_len": 129,
                             "data": rec["stages"][0]["data"]})
    rc, err = _check(capsys, _write(tmp_path, rec))
    assert rc == 2 and "stages[0].seq_len" in err and "128" in err
    rec["stages"][0]["seq_len"] = 128
    rc, err = _check(capsys, _write(tmp_path, rec), "eval.max_new_tokens=128")
    assert rc == 2 and "eval.max_new_tokens" in err


def test_a_prompt_longer_than_the_context_stops_the_run_before_training(tmp_path, capsys):
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(10)]
    rows.insert(2, {"prompt": "9" * 200 + "=", "answer": "1"})
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = _recipe(tmp_path)
    rec["stages"][0]["data"] = {"path": str(f), "heldout_size": 4}
    path = _write(tmp_path, rec)
    assert main(["run", path, "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and f.name in err and "row 3" in err and "context of 128" in err
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / "sft-last").exists()


# --------------------------------------------------------------------------- writing at run time


def test_a_summary_that_cannot_be_written_says_what_and_what_is_kept(tmp_path, capsys, monkeypatch):
    import ccrl.pipeline as pipeline

    real = pipeline.os.replace

    def full_disk(src, dst):
        if str(dst).endswith("summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", full_disk)
    assert main(["run", _write(tmp_path, _recipe(tmp_path)), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "summary.json" in err and "No space left on device" in err and "--resume" in err
    assert "Traceback" not in err and (tmp_path / "run" / "sft" / "trainer_state.json").exists()
    assert not (tmp_path / "run" / "summary.json.tmp").exists()


# --------------------------------------------------------------------------- a recipe is code


def test_check_imports_the_module_a_custom_reward_names(tmp_path, capsys):
    """Documented (rewards/registry.py, docs/recipes.md): validating a recipe runs the top-level
    code of the modules its rewards name."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "my_reward.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "def score(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    rec = _recipe(tmp_path, rewards=[{"name": f"{tmp_path / 'my_reward.py'}:score"}])
    assert main(["check", _write(tmp_path, rec)]) == 0
    assert marker.read_text() == "ran"


def test_output_piped_into_a_reader_that_stops_early_is_not_a_traceback(monkeypatch, tmp_path):
    """`ccrl check recipe | head -1`: the reader has closed the pipe; ccrl stops quietly with exit
    141 (as a shell reports SIGPIPE) instead of a BrokenPipeError traceback."""
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)                                          # the reader went away
    stream = os.fdopen(write_end, "w", buffering=1)             # line-buffered: each print writes
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["check", _write(tmp_path, _recipe(tmp_path))]) == 141
        print("after", file=stream)                             # stdout now goes nowhere, without error
    finally:
        stream.close()


# --------------------------------------------------------------------------- ccrl check reads the data


def test_check_reads_every_data_file_as_the_run_does(tmp_path, capsys):
    """`ccrl check` reads the rows a run would read before training: a broken line exits 2 naming
    the file and line; a good file prints each stage's example counts."""
    good = tmp_path / "rl.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40)))
    stage = {"kind": "rl", "name": "rl", "data": {"path": str(good), "heldout_size": 5}, "steps": 2,
             "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2, "objective": "grpo"}
    rec = _recipe(tmp_path, rewards=[{"name": "exact_match"}])
    rec["stages"].append(stage)
    rc = main(["check", _write(tmp_path, rec)])
    out = capsys.readouterr().out
    assert rc == 0
    counts = re.search(r"rl: rl, 2 steps, data \S*rl.jsonl \((\d+) training, (\d+) held-out examples\)", out)
    assert counts and int(counts[1]) + int(counts[2]) == 40 and 0 < int(counts[2]) <= 5   # split by a hash
    assert "sft: sft, 2 steps, data arithmetic (32 training, 4 held-out examples)" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n" + '{"prompt": "2+2=", "answer": 4\n')
    rc, err = _check(capsys, _write(tmp_path, rec), f"stages.rl.data.path={bad}")
    assert rc == 2 and "bad.jsonl" in err and "line 2 is not valid JSON" in err


def test_a_bad_top_level_reward_is_named_where_it_is_written(tmp_path, capsys):
    """An rl stage without rewards of its own takes the top-level ones; a misspelt one is named as
    `rewards[i]`, where the user wrote it, not as the stage's."""
    rec = _recipe(tmp_path, rewards=[{"name": "exact_match"}, {"name": "exact_mach"}])
    rec["stages"].append({"kind": "rl", "name": "rl", "steps": 2, "prompts_per_step": 2, "group_size": 2,
                          "max_new_tokens": 2, "objective": "grpo"})
    rc, err = _check(capsys, _write(tmp_path, rec))
    assert rc == 2 and err.startswith(f"ccrl: error: {tmp_path / 'r.yaml'}: rewards[1]:") and "exact_match" in err
