"""The shipped chat example, recipes/chat_reward_model.yaml, end to end on models built here:
``python -m ccrl.data.local_models OUT`` writes a tiny Qwen2 chat policy and a Qwen2 reward model
(nothing downloaded), then SFT on ``messages`` → GRPO scored by the reward model and exact_match →
DPO on message pairs, with the steps cut so it runs in seconds. The final checkpoint is a plain
Hugging Face folder that answers a chat-templated question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import chat_example_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "chat_reward_model.yaml"
STAGES = ("sft", "rl", "dpo")


@pytest.fixture(scope="module")
def example_models(chat_example_models):
    return chat_example_models


def _overrides(models: Path, run: Path) -> list[str]:
    return [f"output_dir={run}"] + chat_example_overrides(models)


def test_the_generated_models_share_one_chat_tokenizer(example_models, capsys):
    from transformers import AutoConfig, AutoTokenizer

    policy, reward = example_models / "policy", example_models / "reward"
    assert AutoConfig.from_pretrained(policy).architectures == ["Qwen2ForCausalLM"]
    cfg = AutoConfig.from_pretrained(reward)
    assert cfg.architectures == ["Qwen2ForSequenceClassification"] and cfg.num_labels == 1
    assert (policy / "tokenizer.json").read_bytes() == (reward / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(reward)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"


def test_the_shipped_data_is_what_its_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_chat_arithmetic", ROOT / "recipes" / "data" / "make_chat_arithmetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for path in script.write(tmp_path):
        assert path.read_bytes() == (ROOT / "recipes" / "data" / path.name).read_bytes(), path.name


def test_the_council_variant_in_the_header_validates(example_models, tmp_path):
    from ccrl.config import load_recipe

    rec = load_recipe(RECIPE, _overrides(example_models, tmp_path / "run")
                      + ["model.council_head=true", "stages.rl.objective=ccrl"])
    assert rec.model.council_head and rec.stage("rl").objective == "ccrl"


def test_chat_reward_model_recipe_end_to_end(example_models, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ccrl import run_recipe

    monkeypatch.chdir(ROOT)                     # the recipe's data paths are relative to the repo root
    run = tmp_path / "run"
    fast = ["stages.sft.steps=4", "stages.rl.steps=2", "stages.rl.prompts_per_step=2", "stages.rl.group_size=4",
            "stages.dpo.steps=2", "stages.dpo.batch_size=4"] + [f"stages.{s}.data.heldout_size=4" for s in STAGES]
    summary = run_recipe(str(RECIPE), overrides=_overrides(example_models, run) + fast, show_progress=False)

    assert [s["name"] for s in summary["stages"]] == ["sft", "rl", "dpo"]
    on_disk = json.loads((run / "summary.json").read_text())
    assert [(s["name"], s["kind"]) for s in on_disk["stages"]] == [("sft", "sft"), ("rl", "rl"), ("dpo", "dpo")]
    for stage in STAGES:
        assert (run / stage / "model.safetensors").is_file() and (run / stage / "tokenizer.json").is_file(), stage
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert len(rl) == 2
    assert all(isinstance(r["reward/reward_model"], float) and "reward/exact_match" in r for r in rl)

    final = run / "dpo"                         # grpo on the model as it is: a plain Qwen2 folder
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "qwen2"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    reply = out[0, ids["input_ids"].shape[1]:]
    assert 0 < len(reply) <= 4
    assert isinstance(tok.decode(reply, skip_special_tokens=True), str)
