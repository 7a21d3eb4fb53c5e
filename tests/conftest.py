"""Shared fixtures: tiny models and recipes built locally (nothing is downloaded)."""

from __future__ import annotations

import copy
import os

import pytest
import torch


def pytest_configure(config):
    """The default run is the CPU suite, also on a machine with a GPU: there it runs as CI runs it,
    with CUDA hidden (its accelerate and gloo tests build CPU processes, and `device: auto` would
    otherwise move half of them to the GPU). `pytest -m gpu` keeps the GPU for the CUDA tests."""
    markexpr = config.getoption("markexpr") or ""
    if "gpu" in markexpr.replace("not gpu", ""):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


ROLLOUT_PROMPTS = ["12+34=", "7-5=", "99*9=", "1+1="]          # ragged: 6, 4, 5, 4 tokens


def special_tokens(tok) -> dict:
    """The tokenizer's vocabulary size and special ids as model config fields."""
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


# Rollout tests: the default character tokenizer, the prompts encoded, and two tiny CPU policies
# (a Llama and a Quillan `toy`); a module may override any of them (the CUDA tests do).
@pytest.fixture(scope="module")
def tok():
    from ccrl.data import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return [tok.encode(p, add_special_tokens=False) for p in ROLLOUT_PROMPTS]


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(TINY_LLAMA)
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf, **special_tokens(tok))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def quillan(tok):
    from policies import QuillanConfig, QuillanForCausalLM

    torch.manual_seed(0)
    return QuillanForCausalLM(QuillanConfig.preset("toy", **special_tokens(tok))).eval()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_recipe(tmp_path):
    """A pretrain → sft recipe on 1-digit addition with a tiny Llama; returns a factory."""

    def make(**top):
        rec = {
            "name": "tiny",
            "seed": 0,
            "output_dir": str(tmp_path / "run"),
            "model": {"hf_config": copy.deepcopy(TINY_LLAMA)},
            "eval": {"max_new_tokens": 4, "batch_size": 64},
            "stages": [
                {"kind": "pretrain", "data": {"task": "arithmetic", "options": {"digits": 1, "ops": "+"},
                                              "num_examples": 200, "heldout_size": 16},
                 "steps": 4, "lr": 3e-3, "batch_size": 8, "seq_len": 32},
                {"kind": "sft", "steps": 4, "lr": 3e-3, "batch_size": 8},
            ],
        }
        rec.update(top)
        return rec

    return make


# The chat example (recipes/chat_reward_model.yaml) reads model folders that `python -m
# ccrl.data.local_models OUT` writes; tests write them once into a temporary folder.
@pytest.fixture(scope="session")
def chat_example_models(tmp_path_factory):
    from ccrl.data.local_models import main

    out = tmp_path_factory.mktemp("chat-example")
    assert main([str(out)]) == 0
    return out


def chat_example_overrides(models) -> list[str]:
    """The recipe's model and reward-model paths pointed at ``models`` (a folder ``main`` wrote)."""
    return [f"model.checkpoint={models / 'policy'}", f"rewards.1.path={models / 'reward'}"]
