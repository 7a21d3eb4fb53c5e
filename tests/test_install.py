"""What a new install depends on: the kernel build against the installed torch, and transformers' public contract.

- ``policies.kernel_build``: the cache key follows torch and the sources, a missing compiler or
  ``CCRL_KERNELS=off`` is reported (and the reference runs), a build killed while holding the
  lock does not block the next one, ``ccrl kernels`` answers as documented.
- No ``FutureWarning`` / ``DeprecationWarning`` from ccrl's own paths (generation through
  transformers and through ccrl's rollout engine, an RL step on a plain Llama and on Quillan),
  on whichever transformers release is installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from ccrl.cli import main as cli
from ccrl.rollout import SamplingConfig, generate
from policies import kernel_build
from tests.conftest import TINY_LLAMA, special_tokens

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- kernel build
def test_build_key_names_the_torch_and_follows_the_sources(tmp_path, monkeypatch):
    key = kernel_build.build_key()
    assert kernel_build.build_key() == key                       # stable within a process
    assert key.startswith(f"torch-{torch.__version__}-py{sys.version_info.major}.{sys.version_info.minor}-")
    src = tmp_path / "csrc"
    shutil.copytree(kernel_build.SOURCE_DIR, src)
    monkeypatch.setattr(kernel_build, "SOURCE_DIR", src)
    assert kernel_build.build_key() == key                       # same sources, same key
    (src / "ternary_scalar.cpp").write_text((src / "ternary_scalar.cpp").read_text() + "\n// changed\n")
    assert kernel_build.build_key() != key
    monkeypatch.setenv(kernel_build.ENV_CACHE, str(tmp_path / "cache"))
    assert kernel_build.build_dir() == tmp_path / "cache" / kernel_build.build_key()


@pytest.fixture
def unloaded(monkeypatch):
    """As in a process that has not loaded the kernels yet."""
    monkeypatch.setattr(kernel_build, "_LOADED", {})


def test_switched_off_and_missing_compiler_are_reported_and_leave_nothing(tmp_path, monkeypatch, unloaded):
    monkeypatch.setenv(kernel_build.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv(kernel_build.ENV_SWITCH, "off")
    with pytest.raises(kernel_build.KernelBuildError, match="switched off by CCRL_KERNELS=off"):
        kernel_build.load()
    monkeypatch.delenv(kernel_build.ENV_SWITCH)
    with pytest.raises(kernel_build.KernelBuildError, match="not built for torch .*ccrl kernels build"):
        kernel_build.load(build=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(kernel_build.KernelBuildError, match="no C\\+\\+ compiler"):
        kernel_build.load()
    assert not any(p.name.startswith(".build-") for p in tmp_path.iterdir())


def test_a_compile_error_is_one_line_and_the_cache_stays_empty(tmp_path, monkeypatch, unloaded):
    pytest.importorskip("ninja")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text("int f( { return 0; }\n")
    monkeypatch.setattr(kernel_build, "SOURCE_DIR", src)
    monkeypatch.setenv(kernel_build.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(kernel_build.KernelBuildError, match="compiling failed"):
        kernel_build.load()
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == []                                            # no half build, no stale binary


def test_a_build_killed_while_holding_the_lock_does_not_block_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv(kernel_build.ENV_CACHE, str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from policies import kernel_build as k\n"
         "with k._locked(k.cache_root()):\n    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)                          # killed mid-build
    holder.wait()
    start = time.monotonic()
    with kernel_build._locked(kernel_build.cache_root()):
        pass
    assert time.monotonic() - start < 5


def test_kernels_command_reports_the_build_or_why_not(tmp_path, monkeypatch, capsys):
    if kernel_build.build_dir().joinpath(f"{kernel_build.NAME}.so").exists():
        assert cli(["kernels", "info"]) == 0
        out = capsys.readouterr().out
        assert f"built for torch {torch.__version__}" in out and "kernel path:" in out
    monkeypatch.setattr(kernel_build, "_LOADED", {})
    monkeypatch.setenv(kernel_build.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cli(["kernels", "info"]) == 0
    assert "not built for torch" in capsys.readouterr().out
    assert cli(["kernels", "build"]) == 1
    err = capsys.readouterr().err
    assert "no C++ compiler" in err and "the PyTorch reference runs instead" in err


# ----------------------------------------------------------------------------- no deprecated arguments
def _deprecations(record) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in record
            if issubclass(w.category, (FutureWarning, DeprecationWarning))]


@pytest.mark.parametrize("policy", ["llama", "quillan", "council_head"])
def test_generation_paths_raise_no_deprecation_warnings(policy, tok, ids):
    from transformers import AutoConfig, AutoModelForCausalLM

    from policies import CouncilHead, QuillanConfig, QuillanForCausalLM

    torch.manual_seed(0)
    if policy == "quillan":
        model = QuillanForCausalLM(QuillanConfig.preset("toy", **special_tokens(tok)))
    else:
        hf = dict(TINY_LLAMA)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf,
                                                                      **special_tokens(tok)))
        if policy == "council_head":
            model = CouncilHead(model, num_personas=4, persona_head_rank=2)
    model.eval()
    batch = tok.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hf_out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        ro = generate(model, ids, SamplingConfig(max_new_tokens=5, greedy=True),
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert _deprecations(record) == []
    assert hf_out.shape[1] > batch["input_ids"].shape[1] and ro.completion_ids.shape[0] == len(ids)


def test_an_rl_step_raises_no_deprecation_warnings(tmp_path):
    from ccrl.pipeline import run_recipe

    rec = {"name": "w", "seed": 0, "output_dir": str(tmp_path / "w"),
           "model": {"hf_config": dict(TINY_LLAMA)}, "eval": {"max_new_tokens": 4},
           "stages": [{"kind": "rl", "objective": "grpo", "steps": 2, "lr": 1e-3, "prompts_per_step": 2,
                       "group_size": 2, "max_new_tokens": 4, "rewards": [{"name": "exact_match"}],
                       "data": {"task": "arithmetic", "options": {"digits": 1}, "num_examples": 20,
                                "heldout_size": 4}}]}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_recipe(rec, show_progress=False, log=lambda *_: None)
    assert _deprecations(record) == []
