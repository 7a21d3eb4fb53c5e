"""Shared fixtures: tiny models and recipes built locally (nothing is downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


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
