"""Model-based rewards (``reward_model``, ``judge``) on tiny local folders built by rewards.testing:
scores against a forward written out here, batch-size invariance, conversational vs plain
rendering, one load per process, the errors (at bind and through ``ccrl check``), an RL stage."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import yaml

import rewards
from rewards import model_based
from rewards.errors import RewardSpecError
from rewards.testing import build_judge, build_reward_model
from tests.conftest import TINY_LLAMA

PROMPTS = ["2+2=", "What is the capital of France?", "Say hi.", "12*3="]
COMPLETIONS = ["4", " Paris, of course; it has been for centuries.", "hi", "36 and some more words here"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "rm": build_reward_model(root / "rm"),
        "rm_qwen2": build_reward_model(root / "rm_qwen2", model_type="qwen2", seed=1),
        "judge": build_judge(root / "judge"),
        "judge_plain": build_judge(root / "judge_plain", chat_template=False, seed=2),
        "rm2": build_reward_model(root / "rm2", num_labels=2),
    }


@pytest.fixture(autouse=True)
def _fresh_cache():
    model_based.clear_cache()
    yield
    model_based.clear_cache()


def _conversations():
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    return prompts, completions


def _classifier(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _by_hand_rm(model, ids: list[int]) -> float:
    """The score written out: the backbone's last hidden state at the last token times the head."""
    with torch.no_grad():
        h = model.model(torch.tensor([ids])).last_hidden_state[0, -1]            # (H,)
        return float(h @ model.score.weight[0])


def _by_hand_judge(folder, text: str, yes: str, no: str, special: bool) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = tok(text, add_special_tokens=special)["input_ids"]
    y, n = tok.encode(yes, add_special_tokens=False)[0], tok.encode(no, add_special_tokens=False)[0]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)  # (V,)
    return float(p[y] / (p[y] + p[n]))


# ---------------------------------------------------------------- reward_model


@pytest.mark.parametrize("which", ["rm", "rm_qwen2"])
def test_reward_model_is_the_logit_at_the_last_token(folders, which):
    model, tok = _classifier(folders[which])
    want = [_by_hand_rm(model, tok(p + c, add_special_tokens=False)["input_ids"])
            for p, c in zip(PROMPTS, COMPLETIONS)]
    got = rewards.reward_model(PROMPTS, COMPLETIONS, path=str(folders[which]), batch_size=1)
    assert got == pytest.approx(want, abs=1e-5, rel=0)
    assert max(want) - min(want) > 0.1          # the tiny model's scores are not all alike


def test_reward_model_batching_does_not_change_scores(folders):
    path = str(folders["rm"])
    one = rewards.reward_model(PROMPTS, COMPLETIONS, path=path, batch_size=1)
    for bs in (2, 3, 8):
        assert rewards.reward_model(PROMPTS, COMPLETIONS, path=path, batch_size=bs) == pytest.approx(one, abs=1e-5)


def test_reward_model_renders_conversations_with_its_chat_template(folders):
    path = str(folders["rm"])
    model, tok = _classifier(folders["rm"])
    prompts, completions = _conversations()
    texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    assert texts[0] == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    want = [_by_hand_rm(model, tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    got = rewards.reward_model(prompts, completions, path=path, batch_size=3)
    assert got == pytest.approx(want, abs=1e-5, rel=0)
    plain = rewards.reward_model(PROMPTS, COMPLETIONS, path=path)
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, plain))
    # a bare string completion of a conversational prompt is the assistant's message
    assert rewards.reward_model(prompts, COMPLETIONS, path=path, batch_size=3) == got


def test_reward_model_truncates_the_start_and_normalizes(folders):
    path = str(folders["rm"])
    model, tok = _classifier(folders["rm"])
    ids = tok(PROMPTS[1] + COMPLETIONS[1], add_special_tokens=False)["input_ids"]
    assert len(ids) > 6
    got = rewards.reward_model(PROMPTS[1:2], COMPLETIONS[1:2], path=path, max_length=6)
    assert got == pytest.approx([_by_hand_rm(model, ids[-6:])], abs=1e-5)
    raw = rewards.reward_model(PROMPTS, COMPLETIONS, path=path)
    norm = rewards.bind("reward_model", path=path, normalize={"mean": 1.5, "std": 2.0})(PROMPTS, COMPLETIONS)
    assert norm == pytest.approx([(r - 1.5) / 2.0 for r in raw], abs=1e-6)


def test_the_model_is_loaded_once_per_process(folders, monkeypatch):
    import transformers

    calls = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", counting)
    path = str(folders["rm"])
    fn = rewards.bind("reward_model", path=path, batch_size=2)
    first = fn(PROMPTS, COMPLETIONS)
    for _ in range(3):
        assert fn(PROMPTS, COMPLETIONS) == first
    rewards.reward_model(PROMPTS[:1], COMPLETIONS[:1], path=path)
    assert len(calls) == 1
    lm = model_based.load_model("reward_model", path)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    model_based.clear_cache()
    fn(PROMPTS, COMPLETIONS)
    assert len(calls) == 2


def test_device_follows_the_policy_only_onto_cuda():
    dev = model_based._device
    assert dev(None, None) == torch.device("cpu")
    assert dev(None, "cpu") == torch.device("cpu")
    assert dev(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert dev("cpu", "cuda:0") == torch.device("cpu")
    assert dev("auto", None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reward_model_on_the_policy_cuda_device(folders):
    path = str(folders["rm"])
    cpu = rewards.reward_model(PROMPTS, COMPLETIONS, path=path)
    gpu = rewards.reward_model(PROMPTS, COMPLETIONS, path=path, policy_device="cuda")
    assert gpu == pytest.approx(cpu, abs=1e-4)
    assert model_based.load_model("reward_model", path, "cuda").model.device.type == "cuda"


# ---------------------------------------------------------------- judge


def test_judge_is_the_yes_probability_among_yes_and_no(folders):
    path = folders["judge"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    got = rewards.judge(PROMPTS, COMPLETIONS, path=str(path), question="Is it right?", batch_size=1)
    for p, c, score in zip(PROMPTS, COMPLETIONS, got):
        body = f"Prompt:\n{p}\n\nResponse:\n{c}\n\nQuestion: Is it right?\nAnswer Yes or No."
        text = f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
        assert model_based.judge_text(tok, body) == text
        assert score == pytest.approx(_by_hand_judge(path, text, "Yes", "No", special=False), abs=1e-6)
    assert all(0.0 < s < 1.0 for s in got)
    for bs in (2, 3, 8):
        batched = rewards.judge(PROMPTS, COMPLETIONS, path=str(path), question="Is it right?", batch_size=bs)
        assert batched == pytest.approx(got, abs=1e-6)


def test_judge_renders_conversations_and_custom_answers(folders):
    path = folders["judge"]
    prompts, completions = _conversations()
    prompts[0] = [{"role": "system", "content": "Be brief."}, *prompts[0]]
    got = rewards.judge(prompts, completions, path=str(path), yes="Good", no="Bad",
                        template="{prompt}\n=> {completion}\n{question} ({yes}/{no})", question="Fine?")
    body = "system: Be brief.\nuser: 2+2=\n=> 4\nFine? (Good/Bad)"
    text = f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    assert got[0] == pytest.approx(_by_hand_judge(path, text, "Good", "Bad", special=False), abs=1e-6)


def test_judge_without_a_chat_template_uses_the_plain_prompt(folders):
    path = folders["judge_plain"]
    got = rewards.judge(PROMPTS[:2], COMPLETIONS[:2], path=str(path), batch_size=2)
    body = model_based.JUDGE_TEMPLATE.format(prompt=PROMPTS[0], completion=COMPLETIONS[0],
                                             question=model_based.JUDGE_QUESTION, yes="Yes", no="No")
    want = _by_hand_judge(path, body + "\nAnswer:", " Yes", " No", special=True)
    assert got[0] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- errors


def _without(folders, tmp_path, *names):
    bare = tmp_path / "without"
    shutil.copytree(folders["rm"], bare)
    for name in names:
        (bare / name).unlink()
    return str(bare)


@pytest.mark.parametrize("name, params, words", [
    ("reward_model", {"path": "{missing}"}, ["{path}", "is not a folder"]),
    ("reward_model", {"path": "{no_weights}"}, ["{path}", "no safetensors weights"]),
    ("reward_model", {"path": "{judge}"}, ["{path}", "LlamaForCausalLM", "not a sequence classifier"]),
    ("reward_model", {"path": "{rm2}"}, ["{path}", "2 labels"]),
    ("reward_model", {"path": "{no_tokenizer}"}, ["{path}", "cannot load the tokenizer"]),
    ("reward_model", {}, ["needs a 'path'"]),
    ("reward_model", {"path": "{rm}", "batch_size": 0}, ["batch_size"]),
    ("reward_model", {"path": "{rm}", "normalize": {"mean": 0, "std": 0}}, ["normalize.std"]),
    ("reward_model", {"path": "{rm}", "normalize": {"avg": 0}}, ["normalize"]),
    ("reward_model", {"path": "{rm}", "dtype": "int8"}, ["dtype"]),
    ("reward_model", {"path": "{rm}", "devcie": "cpu"}, ["did you mean 'device'"]),
    ("judge", {"path": "{missing}"}, ["{path}", "is not a folder"]),
    ("judge", {"path": "{rm}"}, ["{path}", "LlamaForSequenceClassification", "not a generative model"]),
    ("judge", {"path": "{judge}", "yes": "Yes", "no": "Yes!"}, ["{path}", "start with the same token"]),
    ("judge", {"path": "{judge}", "template": "{prompt} {answer}"}, ["template"]),
    ("judge", {"path": "{judge}", "template": "{prompt} only"}, ["{completion}"]),
])
def test_bad_params_are_reward_spec_errors_naming_the_path(folders, tmp_path, name, params, words):
    paths = {k: str(v) for k, v in folders.items()}
    paths["missing"] = str(tmp_path / "nowhere")
    if "{no_weights}" in params.get("path", ""):
        paths["no_weights"] = _without(folders, tmp_path, "model.safetensors")
    if "{no_tokenizer}" in params.get("path", ""):
        paths["no_tokenizer"] = _without(folders, tmp_path, "tokenizer.json", "tokenizer_config.json",
                                         "chat_template.jinja")
    params = {k: v.format(**paths) if isinstance(v, str) and k == "path" else v for k, v in params.items()}
    with pytest.raises(RewardSpecError) as e:
        rewards.bind(name, **params)
    for w in words:
        w = w.replace("{path}", params.get("path", ""))
        assert w in str(e.value), (w, str(e.value))
    if "{path}" in words:  # a bad folder fails the same way when the function is called directly
        with pytest.raises(RewardSpecError, match="not a|no safetensors|labels|same token|tokenizer"):
            rewards.get(name)(PROMPTS, COMPLETIONS, **params)


def test_a_conversation_for_a_reward_model_without_chat_template(tmp_path):
    path = build_reward_model(tmp_path / "rm_plain", chat_template=False)
    prompts, completions = _conversations()
    with pytest.raises(RewardSpecError, match="no chat template"):
        rewards.reward_model(prompts, completions, path=str(path))
    assert len(rewards.reward_model(PROMPTS, COMPLETIONS, path=str(path))) == len(PROMPTS)


# ---------------------------------------------------------------- recipes


def _rl_recipe(tmp_path, reward_entries, steps=2):
    return {"name": "rm", "seed": 0, "output_dir": str(tmp_path / "run"),
            "model": {"hf_config": copy.deepcopy(TINY_LLAMA)}, "eval": {"max_new_tokens": 4},
            "stages": [{"kind": "rl", "objective": "grpo",
                        "data": {"task": "arithmetic", "options": {"digits": 1}, "num_examples": 40,
                                 "heldout_size": 4},
                        "steps": steps, "lr": 1e-2, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4,
                        "rewards": reward_entries, "warmup_steps": 0, "lr_schedule": "constant"}]}


def test_ccrl_check_exits_2_on_a_bad_reward_model_path(folders, tmp_path, capsys):
    from ccrl.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_rl_recipe(tmp_path, [{"name": "reward_model", "path": str(tmp_path / "no")}])))
    assert main(["check", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "bad.yaml" in err and "rewards" in err and "is not a folder" in err
    causal = tmp_path / "causal.yaml"
    causal.write_text(yaml.safe_dump(_rl_recipe(tmp_path, [{"name": "reward_model", "path": str(folders["judge"])}])))
    assert main(["check", str(causal)]) == 2
    assert "not a sequence classifier" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_rl_recipe(tmp_path, [{"name": "reward_model", "path": str(folders["rm"])},
                                                         {"name": "judge", "path": str(folders["judge"])}])))
    assert main(["check", str(good)]) == 0


def test_rl_stage_with_a_reward_model_and_a_judge(folders, tmp_path):
    from ccrl.pipeline import run_recipe

    rec = _rl_recipe(tmp_path, [{"name": "reward_model", "path": str(folders["rm"]), "batch_size": 3},
                                {"name": "judge", "path": str(folders["judge"]), "weight": 0.5}])
    run_recipe(rec, show_progress=False, log=lambda *_: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert math.isfinite(line["reward/reward_model"]) and 0.0 < line["reward/judge"] < 1.0
        assert line["reward"] == pytest.approx(line["reward/reward_model"] + 0.5 * line["reward/judge"], abs=1e-4)
    assert len(model_based._CACHE) == 2       # each folder loaded once for the whole stage


def test_importing_the_model_based_rewards_loads_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, rewards, rewards.model_based, rewards.testing; "
            "print([m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
