"""A TRL user's controls: held-out data (eval_path, heldout_fraction), AdamW betas/eps, activation
checkpointing, ``--set`` with several pairs, and exact_match without stripping."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.pipeline import run_recipe
from tests.conftest import TINY_LLAMA, special_tokens

QUIET = {"show_progress": False, "log": lambda *_: None}


def _rows(n, offset=0):
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(offset, offset + n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sft(out, data, **stage):
    st = {"kind": "sft", "data": data, "steps": 1, "lr": 1e-3, "batch_size": 4}
    st.update(stage)
    return {"name": "u", "seed": 0, "output_dir": str(out), "model": {"hf_config": copy.deepcopy(TINY_LLAMA)},
            "eval": {"max_new_tokens": 3, "batch_size": 64}, "stages": [st]}


# --------------------------------------------------------------------------- data: eval_path, heldout_fraction


def _seen(tmp_path, data, name):
    seen = {}

    def grab(trainer, step, metrics):
        seen["train"] = [e.prompt for e in trainer.ctx.train_examples]
        seen["heldout"] = [e.prompt for e in trainer.ctx.heldout]

    summary = run_recipe(_sft(tmp_path / name, data), callbacks=[grab], **QUIET)
    return seen, summary["stages"][0]["metrics"]


def test_default_split_holds_out_a_tenth_by_hash(tmp_path):
    from ccrl.data import split_of

    train = _write(tmp_path / "train.jsonl", _rows(200))
    seen, metrics = _seen(tmp_path, {"path": train}, "default")
    expect = [r["prompt"] for r in _rows(200) if split_of(r["prompt"]) == "heldout"]
    assert seen["heldout"] == expect and 5 < len(expect) < 40
    assert len(seen["train"]) == 200 - len(expect) and not set(seen["train"]) & set(expect)
    assert "heldout_accuracy" in metrics


def test_heldout_fraction_0_trains_on_every_row(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows(50))
    seen, metrics = _seen(tmp_path, {"path": train, "heldout_fraction": 0}, "all")
    assert seen["train"] == [r["prompt"] for r in _rows(50)] and seen["heldout"] == []
    assert "heldout_accuracy" not in metrics
    seen, _ = _seen(tmp_path, {"path": train, "heldout_fraction": 0.5}, "half")
    assert 10 < len(seen["heldout"]) < 40 and len(seen["train"]) + len(seen["heldout"]) == 50


def test_eval_path_is_the_heldout_set_and_every_training_row_trains(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows(50))
    held = _write(tmp_path / "eval.jsonl", _rows(7, offset=100))
    seen, metrics = _seen(tmp_path, {"path": train, "eval_path": held}, "sep")
    assert seen["train"] == [r["prompt"] for r in _rows(50)]
    assert seen["heldout"] == [r["prompt"] for r in _rows(7, offset=100)]
    assert "heldout_accuracy" in metrics


@pytest.mark.parametrize("data, match", [
    ({"task": "arithmetic", "eval_path": "x.jsonl"}, "eval_path: applies to a data file"),
    ({"task": "arithmetic", "heldout_fraction": 0}, "heldout_fraction: applies to a data file"),
    ({"path": "TRAIN", "eval_path": "nope.jsonl"}, "eval_path: file not found: nope.jsonl"),
    ({"path": "TRAIN", "heldout_fraction": 1}, r"heldout_fraction: expected a number in \[0, 1\)"),
    ({"path": "TRAIN", "heldout_fraction": -0.1}, "heldout_fraction: expected"),
    ({"path": "TRAIN", "heldout_fraction": 0.1, "eval_path": "TRAIN"}, "give one of them"),
])
def test_data_keys_are_checked(tmp_path, data, match):
    train = _write(tmp_path / "train.jsonl", _rows(10))
    data = {k: (train if v == "TRAIN" else v) for k, v in data.items()}
    with pytest.raises(RecipeError, match=match):
        load_recipe(_sft(tmp_path / "r", data))


# --------------------------------------------------------------------------- optimizer keys


def test_adam_betas_and_epsilon_reach_the_optimizer(tmp_path):
    got = {}

    def grab(trainer, step, metrics):
        g = trainer.optimizer.param_groups[0]
        got[trainer.stage.name] = (tuple(g["betas"]), g["eps"], g["weight_decay"])

    rec = _sft(tmp_path / "o", {"task": "arithmetic", "options": {"digits": 1}, "heldout_size": 4},
               adam_betas=[0.8, 0.999], adam_epsilon=1e-6, weight_decay=0.01)
    rec["stages"].append({"kind": "sft", "name": "plain", "steps": 1, "batch_size": 4})
    run_recipe(rec, callbacks=[grab], **QUIET)
    assert got["sft"] == ((0.8, 0.999), 1e-6, 0.01)
    assert got["plain"] == ((0.9, 0.95), 1e-8, 0.0)          # the defaults are unchanged
    for bad in ([0.9], [0.9, 1.0], [-0.1, 0.9]):
        with pytest.raises(RecipeError, match="adam_betas"):
            load_recipe(_sft(tmp_path / "o", {"task": "arithmetic"}, adam_betas=bad))
    with pytest.raises(RecipeError, match="adam_epsilon"):
        load_recipe(_sft(tmp_path / "o", {"task": "arithmetic"}, adam_epsilon=0))


# --------------------------------------------------------------------------- gradient checkpointing


def _checkpointing(model) -> bool:
    """Whether activation checkpointing is on (the property's name changed in transformers 5.x)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return getattr(model, name)


def _grads(model, ids, checkpointing: bool) -> dict:
    from ccrl.trainers.base import enable_gradient_checkpointing

    m = copy.deepcopy(model).train()
    if checkpointing:
        enable_gradient_checkpointing(m, "s")
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        assert _checkpointing(base)
    out = m(input_ids=ids, labels=ids)
    loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "quillan", "llama_lora"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ccrl.data import default_tokenizer

    tok = default_tokenizer()
    torch.manual_seed(0)
    if kind == "quillan":
        from policies import QuillanConfig, QuillanForCausalLM

        model = QuillanForCausalLM(QuillanConfig.preset("toy", **special_tokens(tok)))
    else:
        hf = dict(TINY_LLAMA)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf, **special_tokens(tok)))
    if kind == "llama_lora":
        from ccrl.config.schema import PeftConfig
        from ccrl.pipeline import apply_peft

        model = apply_peft(model, PeftConfig(r=4, alpha=8))
        for n, p in model.named_parameters():      # LoRA B starts at 0: give A a gradient to compare
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, len(tok), (3, 12), generator=torch.Generator().manual_seed(1))
    plain, ckpt = _grads(model, ids, False), _grads(model, ids, True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert not _checkpointing(base)


def test_gradient_checkpointing_in_an_rl_stage_and_refused_where_unsupported(tmp_path):
    rec = {"name": "gc", "seed": 0, "output_dir": str(tmp_path / "gc"),
           "model": {"hf_config": copy.deepcopy(TINY_LLAMA)}, "eval": {"max_new_tokens": 3},
           "stages": [{"kind": "rl", "objective": "grpo", "steps": 2, "lr": 1e-2, "prompts_per_step": 2,
                       "group_size": 2, "max_new_tokens": 3, "gradient_checkpointing": True,
                       "data": {"task": "arithmetic", "options": {"digits": 1}, "heldout_size": 4},
                       "rewards": ["exact_match"]}]}
    seen = {}

    def grab(trainer, step, metrics):
        seen["on"] = _checkpointing(trainer.unwrapped)

    summary = run_recipe(rec, callbacks=[grab], **QUIET)
    assert summary["stages"][0]["steps"] == 2 and seen["on"]
    from ccrl.trainers.base import enable_gradient_checkpointing

    with pytest.raises(RecipeError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "rl")


# --------------------------------------------------------------------------- --set with several pairs


def test_set_takes_several_pairs_and_repeats(tmp_path, capsys, monkeypatch):
    import ccrl.cli as cli

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(_sft(tmp_path / "run", {"task": "arithmetic"})))
    args = cli._parse(["run", str(f), "--set", "stages.sft.steps=7", "stages.sft.lr=1e-4", "--set", "seed=3"])
    assert args.recipe == str(f) and args.overrides == ["stages.sft.steps=7", "stages.sft.lr=1e-4", "seed=3"]
    args = cli._parse(["check", "--set", "a=1", "b=2", str(f)])      # the recipe after the pairs
    assert args.recipe == str(f) and args.overrides == ["a=1", "b=2"]
    args = cli._parse(["compare", str(f), "--set", "a=1", "b=2", "--jobs", "2"])
    assert args.overrides == ["a=1", "b=2"] and args.jobs == 2
    assert cli.main(["check", str(f), "--set", "stages.sft.steps=7", "seed=3"]) == 0
    assert "sft: sft, 7 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli._parse(["check", "--set", "a=1"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- exact_match strip


@pytest.mark.parametrize("completion, strip, want", [
    ("59", True, 1.0), ("59 ", True, 1.0), (" 59", True, 1.0), ("\n59\n", True, 1.0), ("5 9", True, 0.0),
    ("59", False, 1.0), ("59 ", False, 0.0), (" 59", False, 0.0), ("\n59", False, 0.0),
])
def test_exact_match_strip_option(completion, strip, want):
    import rewards

    fn = rewards.bind("exact_match", strip=strip)
    assert fn(["q"], [completion], answer=["59"]) == [want]


def test_exact_match_strip_must_be_a_bool():
    import rewards
    from rewards.errors import RewardError

    with pytest.raises(RewardError, match="strip"):
        rewards.get("exact_match")(["q"], ["59"], answer=["59"], strip="no")
