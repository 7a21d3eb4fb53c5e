"""A TRL user's own model, data and reward: local chat checkpoints (Llama, Qwen2), conversational
data in TRL's formats (SFT ``messages``, RL prompts as messages, preference message pairs), custom
rewards called with TRL's conversational arguments, and ``council_head: true`` on a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rewards
from ccrl.cli import main as cli
from ccrl.config import load_recipe
from ccrl.data import examples_from_rows, load_rows
from ccrl.data.local_models import write_chat_model
from ccrl.errors import CheckpointError, DataError, RecipeError
from ccrl.scoring import RewardState, reward_inputs

ARCHS = ("llama", "qwen2")
USER = "user"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-models")
    out = {arch: write_chat_model(root / arch, arch) for arch in ARCHS}
    out["plain"] = write_chat_model(root / "plain", "qwen2", chat_template=False)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n=24):
    return [{"messages": [msg(USER, f"What is {i}+1?"), msg("assistant", str(i + 1))], "topic": "sum"}
            for i in range(n)]


def rl_rows(n=24):
    return [{"prompt": [msg("system", "Answer briefly."), msg(USER, f"What is {i}+2?")], "answer": str(i + 2),
             "topic": f"t{i % 3}"} for i in range(n)]


def pref_rows(n=24, implicit=False):
    rows = []
    for i in range(n):
        prompt = [msg(USER, f"Is {i} a number?")]
        chosen, rejected = [msg("assistant", "yes")], [msg("assistant", "no")]
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected} if implicit
                    else {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# --------------------------------------------------------------------------- the local models


@pytest.mark.parametrize("arch", ARCHS)
def test_local_chat_models_load_with_their_own_tokenizer(models, arch):
    from transformers import AutoConfig

    from ccrl.models import load_policy, load_tokenizer

    tok = load_tokenizer(models[arch])
    assert tok.chat_template and tok.eos_token_id is not None
    assert tok.pad_token_id is not None            # llama has none saved: EOS stands in, as TRL does
    if arch == "llama":
        assert tok.pad_token == tok.eos_token == "<|eot_id|>" and tok.bos_token == "<|begin_of_text|>"
    else:
        assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    model, _ = load_policy(models[arch])
    assert AutoConfig.from_pretrained(models[arch]).model_type == arch == model.config.model_type


def test_pickled_weights_only_are_refused(models, tmp_path):
    import shutil

    from ccrl.models import load_policy

    folder = tmp_path / "bin-only"
    shutil.copytree(models["qwen2"], folder)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        load_policy(folder)
    rec = {"name": "bin", "output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(folder)},
           "stages": [{"kind": "sft", "data": {"path": str(write_jsonl(tmp_path / "s.jsonl", sft_rows()))}}]}
    with pytest.raises(RecipeError, match=r"model\.checkpoint:.*safetensors only"):
        load_recipe(rec)


# --------------------------------------------------------------------------- data formats


def test_sft_assistant_mask_matches_a_hand_computed_one(models):
    """ChatML: the loss covers each assistant reply and its end-of-turn marker, nothing else."""
    from ccrl.models import load_tokenizer
    from ccrl.trainers.supervised import conversation_row

    tok = load_tokenizer(models["qwen2"])
    conv = [msg("system", "Be brief."), msg(USER, "Hi"), msg("assistant", "Hello!"), msg(USER, "2+2?"),
            msg("assistant", "4")]
    ids, mask = conversation_row(tok, conv)
    # the same conversation written out by hand, segment by segment: (text, trained)
    by_hand = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0),
               ("Hello!<|im_end|>\n", 1),
               ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
               ("4<|im_end|>\n", 1)]
    want_ids, want_mask = [], []
    for text, trained in by_hand:
        part = tok.encode(text, add_special_tokens=False)
        want_ids += part
        want_mask += [trained] * len(part)
    assert ids == want_ids and mask == want_mask
    assert tok.decode(ids) == "".join(t for t, _ in by_hand) == tok.apply_chat_template(conv, tokenize=False)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert trained.count(tok.eos_token_id) == 2     # the model learns to end its turn (EOS = <|im_end|>)


def test_sft_assistant_mask_llama_template(models):
    from ccrl.models import load_tokenizer
    from ccrl.trainers.supervised import conversation_row

    tok = load_tokenizer(models["llama"])
    ids, mask = conversation_row(tok, [msg(USER, "Hi"), msg("assistant", "Yo")])
    head = tok.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    tail = tok.encode("Yo<|eot_id|>", add_special_tokens=False)
    assert ids == head + tail and mask == [0] * len(head) + [1] * len(tail)


def test_conversational_rows_load_and_render(models, tmp_path):
    from ccrl.models import load_tokenizer

    tok = load_tokenizer(models["qwen2"])
    rl = load_rows(write_jsonl(tmp_path / "rl.jsonl", rl_rows(3)), "rl")
    ex = examples_from_rows(rl, tok, "rl.jsonl")[0]
    assert ex.messages == rl_rows(1)[0]["prompt"] and ex.answer == "2" and ex.extra == {"topic": "t0"}
    assert ex.prompt == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 0+2?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    sft = examples_from_rows(load_rows(write_jsonl(tmp_path / "s.jsonl", sft_rows(2)), "sft"), tok)[0]
    assert sft.conversation == sft_rows(1)[0]["messages"] and sft.messages == [msg(USER, "What is 0+1?")]
    assert sft.prompt.endswith("<|im_start|>assistant\n")
    for implicit in (False, True):
        rows = load_rows(write_jsonl(tmp_path / f"p{implicit}.jsonl", pref_rows(2, implicit)), "preference")
        assert rows[0]["prompt"] == [msg(USER, "Is 0 a number?")] and rows[0]["chosen"] == [msg("assistant", "yes")]
        pe = examples_from_rows(rows, tok)[0]
        assert pe.extra["chosen"] == "yes<|im_end|>\n" and pe.extra["rejected"] == "no<|im_end|>\n"
        assert pe.prompt.endswith("<|im_start|>assistant\n")


def test_conversational_split_is_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", rl_rows(200))
    train, held = load_rows(path, "rl", split="train"), load_rows(path, "rl", split="heldout")
    assert len(train) + len(held) == 200 and held
    key = lambda r: json.dumps(r["prompt"])
    assert not {key(r) for r in train} & {key(r) for r in held}


@pytest.mark.parametrize("rows, kind, match", [
    ([{"prompt": [msg(USER, "a")]}, {"prompt": "b"}], "rl", r"row 2, column 'prompt': expected a list of messages"),
    ([{"prompt": [{"content": "a"}]}], "rl", r"row 1, column 'prompt': message 0 has no 'role'"),
    ([{"prompt": [msg(USER, "a")]}, {"prompt": []}], "rl", r"row 2, column 'prompt': the list of messages is empty"),
    ([{"messages": [msg(USER, "a")]}], "sft", r"row 1, column 'messages': no assistant message"),
    ([{"prompt": [msg(USER, "a")], "completion": [msg("assistant", "b")]}], "sft", r"one 'messages' column"),
    ([{"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]}], "preference", r"row 1: .*no prompt"),
])
def test_bad_conversational_rows_name_the_row_and_column(tmp_path, rows, kind, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=match) as err:
        load_rows(path, kind)
    assert str(path) in str(err.value)


def test_conversations_need_a_chat_template(models, tmp_path):
    from ccrl.models import load_tokenizer

    path = write_jsonl(tmp_path / "conv.jsonl", rl_rows(4))
    with pytest.raises(DataError, match=r"conv\.jsonl, row 1, column 'prompt': .*no chat template"):
        examples_from_rows(load_rows(path, "rl"), load_tokenizer(models["plain"]), path)
    rec = {"name": "nt", "output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(models["plain"])},
           "rewards": [{"name": "exact_match"}],
           "stages": [{"kind": "rl", "objective": "grpo", "data": {"path": str(path)}, "steps": 1}]}
    (tmp_path / "r.yaml").write_text(json.dumps(rec))
    assert cli(["run", str(tmp_path / "r.yaml")]) == 2


# --------------------------------------------------------------------------- rewards


def test_reward_inputs_and_exact_match_on_conversations():
    from ccrl.data import Example

    prompts, completions = reward_inputs([Example("<r>", "4", messages=[msg(USER, "2+2?")])] * 2, ["4", " 5"])
    assert prompts == [[msg(USER, "2+2?")]] * 2
    assert completions == [[msg("assistant", "4")], [msg("assistant", " 5")]]
    assert rewards.get("exact_match")(prompts, completions, answer=["4", "4"]) == [1.0, 0.0]
    assert rewards.get("numeric_match")(prompts, completions, answer=["4", "5"]) == [1.0, 1.0]


CALLS: list[dict] = []


@rewards.register("test_trl_conversational_args", override=True)
def trl_conversational_args(prompts, completions, completion_ids, trainer_state, topic, answer, log_metric,
                            **kwargs):
    """Asserts TRL's conversational reward arguments; rewards "2" in the reply."""
    n = len(prompts)
    assert len(completions) == len(completion_ids) == len(topic) == len(answer) == n
    for p, c, ids in zip(prompts, completions, completion_ids):
        assert isinstance(p, list) and p[-1]["role"] == "user" and all({"role", "content"} <= set(m) for m in p)
        assert isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
        assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert all(t in ("t0", "t1", "t2") for t in topic)
    assert isinstance(trainer_state.global_step, int) and trainer_state.max_steps >= 0
    log_metric("custom/calls", 1.0)
    CALLS.append({"step": trainer_state.global_step, "stage": trainer_state.stage, "n": n})
    return [float("2" in c[0]["content"]) for c in completions]


def _recipe(tmp_path, models, arch, council: bool):
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    rl = write_jsonl(tmp_path / "rl.jsonl", rl_rows())
    pref = write_jsonl(tmp_path / "pref.jsonl", pref_rows(implicit=arch == "llama"))
    model = {"checkpoint": str(models[arch])}
    if council:
        model["council_head"] = True
    return {
        "name": f"byo-{arch}", "seed": 0, "output_dir": str(tmp_path / "run"), "model": model, "threads": 1,
        "eval": {"max_new_tokens": 3, "batch_size": 8},
        "stages": [
            {"kind": "sft", "data": {"path": str(sft), "heldout_size": 2}, "steps": 2, "lr": 1e-2, "batch_size": 4},
            {"kind": "rl", "objective": "ccrl" if council else "grpo", "data": {"path": str(rl), "heldout_size": 2},
             "steps": 2, "lr": 1e-2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3,
             "rewards": [{"name": "test_trl_conversational_args"}, {"name": "exact_match", "weight": 0.5}]},
            {"kind": "dpo", "data": {"path": str(pref), "heldout_size": 2}, "steps": 2, "lr": 1e-2, "batch_size": 2,
             "pairs": {"heldout_pairs": 2}},
        ],
    }


@pytest.mark.parametrize("arch, council", [("llama", False), ("qwen2", True)])
def test_own_chat_model_sft_rl_dpo_end_to_end(models, tmp_path, arch, council):
    from ccrl.models import load_policy
    from ccrl.pipeline import run_recipe

    CALLS.clear()
    rec = _recipe(tmp_path, models, arch, council)
    start, _ = load_policy(models[arch])
    summary = run_recipe(rec, show_progress=False, log=lambda *a: None)
    assert [s["kind"] for s in summary["stages"]] == ["sft", "rl", "dpo"]
    train_calls = [c for c in CALLS if c["stage"] == "rl"]
    assert {c["step"] for c in train_calls} >= {0, 1}                      # trainer_state.global_step moves
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rl = [x for x in lines if x["stage"] == "rl"]
    assert len(rl) == 2 and all(x["custom/calls"] == 1.0 for x in rl)    # log_metric reaches metrics.jsonl
    assert "reward/test_trl_conversational_args" in summary["stages"][1]["metrics"]
    assert summary["stages"][2]["metrics"]["pairs"] > 0
    final, tok = load_policy(tmp_path / "run" / "dpo")
    from policies import CouncilHead

    assert isinstance(final, CouncilHead) == council
    assert final.config.model_type == arch and tok.chat_template
    base = final.base if council else final
    changed = [not torch.equal(a, b) for a, b in zip(base.state_dict().values(), start.state_dict().values())]
    assert any(changed)
    if council:
        assert (tmp_path / "run" / "rl" / "council_head.json").exists()
        assert any(x.get("council_entropy") is not None for x in rl)


# --------------------------------------------------------------------------- council_head on a checkpoint


def test_council_head_wraps_a_checkpoint(models):
    from ccrl.config.schema import ModelConfig
    from ccrl.models import build_model, load_tokenizer, spec_has_council
    from policies import CouncilHead

    tok = load_tokenizer(models["qwen2"])
    plain = ModelConfig(checkpoint=str(models["qwen2"]))
    wrapped = ModelConfig(checkpoint=str(models["qwen2"]), council_head=True)
    assert not isinstance(build_model(plain, tok), CouncilHead) and not spec_has_council(plain)
    model = build_model(wrapped, tok)
    assert isinstance(model, CouncilHead) and model.base.config.model_type == "qwen2" and spec_has_council(wrapped)
    out = model(input_ids=torch.tensor([tok.encode("hi", add_special_tokens=False)]))
    assert out.council_weights.shape[-1] == 32


def test_ccrl_without_a_council_is_refused_when_checked(models, tmp_path):
    rl = write_jsonl(tmp_path / "rl.jsonl", rl_rows())
    rec = {"name": "nc", "output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(models["llama"])},
           "rewards": [{"name": "exact_match"}],
           "stages": [{"kind": "rl", "objective": "ccrl", "data": {"path": str(rl)}, "steps": 1}]}
    with pytest.raises(RecipeError, match=r"stages\[0\] \(rl\)\.objective: 'ccrl' needs a council.*council_head: true"):
        load_recipe(rec)
    path = tmp_path / "nc.yaml"
    path.write_text(json.dumps(rec))
    assert cli(["check", str(path)]) == 2
    rec["model"]["council_head"] = True
    path.write_text(json.dumps(rec))
    assert cli(["check", str(path)]) == 0
    hf = {"name": "hf", "output_dir": str(tmp_path / "r2"), "rewards": [{"name": "exact_match"}],
          "model": {"hf_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32}},
          "stages": [{"kind": "rl", "data": {"task": "arithmetic"}, "steps": 1}]}   # objective defaults to ccrl
    with pytest.raises(RecipeError, match=r"objective: 'ccrl' needs a council"):
        load_recipe(hf)


def test_a_council_head_folder_loads_with_automodel_and_checks_against_the_wrapped_models_context(models, tmp_path):
    """A council-head checkpoint loads with ``AutoModelForCausalLM`` (its top-level config.json);
    an export of a folder from before that file gets one; ``ccrl check`` reads the context from
    ``base/config.json`` (the qwen2 test model's 256 positions)."""
    from transformers import AutoModelForCausalLM

    from ccrl.export import export_checkpoint
    from ccrl.models import load_policy
    from policies import CouncilHead

    ckpt = tmp_path / "council"
    model, tok = load_policy(models["qwen2"])
    CouncilHead(model, num_personas=4, persona_head_rank=2).eval().save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    ids = torch.tensor([tok.encode("What is 1+1?", add_special_tokens=False)])
    ref = CouncilHead.from_pretrained(ckpt).eval()(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(ckpt).eval()(input_ids=ids).logits, ref)
    (ckpt / "config.json").unlink()                                   # as written before the file existed
    export_checkpoint(ckpt, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert type(loaded) is CouncilHead and torch.equal(loaded(input_ids=ids).logits, ref)
    CouncilHead.from_pretrained(ckpt).save_pretrained(ckpt)
    rl = write_jsonl(tmp_path / "rl.jsonl", rl_rows())
    rec = {"name": "ctx", "output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(ckpt)},
           "rewards": [{"name": "exact_match"}],
           "stages": [{"kind": "rl", "objective": "ccrl", "data": {"path": str(rl)}, "steps": 1,
                       "max_new_tokens": 300}]}
    path = tmp_path / "ctx.yaml"
    path.write_text(json.dumps(rec))
    assert cli(["check", str(path)]) == 2                             # 300 new tokens past a context of 256
    rec["stages"][0]["max_new_tokens"] = 8
    path.write_text(json.dumps(rec))
    assert cli(["check", str(path)]) == 0


def test_reward_state_is_trainer_state_like():
    s = RewardState(global_step=3, max_steps=10, stage="rl")
    assert (s.global_step, s.max_steps, s.stage) == (3, 10, "rl")


# --------------------------------------------------------------------------- recipe-wide rewards on SFT rows


@rewards.register("test_needs_answer", override=True)
def needs_answer(completions, answer, **kwargs):
    """A TRL reward written for the RL rows: ``answer`` is required and must be a string."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def test_reward_set_skips_a_reward_whose_required_column_the_rows_lack_only_when_asked():
    from ccrl.config.schema import RewardSpec
    from ccrl.scoring import RewardSet
    from rewards.errors import RewardError

    specs = [RewardSpec(name="test_needs_answer"), RewardSpec(name="exact_match", weight=0.5)]
    rs, training = RewardSet(specs, heldout=True), RewardSet(specs)
    completions = [[msg("assistant", "4")], [msg("assistant", "5")]]
    prompts = [[msg(USER, "2+2?")]] * 2
    sb = rs.score(prompts, completions, answer=[None, None])
    assert sb.not_scored == {"test_needs_answer": "it requires 'answer', which these rows do not have"}
    assert torch.isnan(sb.per_reward["test_needs_answer"]).all() and sb.unscorable.all()
    scored = rs.score(prompts, completions, answer=["4", "6"])
    assert scored.not_scored == {} and scored.per_reward["test_needs_answer"].tolist() == [1.0, 0.0]
    with pytest.raises(RewardError, match="'test_needs_answer' raised TypeError"):   # one row has it: called
        rs.score(prompts, completions, answer=["4", None])
    with pytest.raises(RewardError, match="'test_needs_answer' raised TypeError"):   # training calls every reward
        training.score(prompts, completions, answer=[None, None])
    with pytest.raises(RewardError, match="'test_needs_answer' raised TypeError"):   # a column absent, not None
        training.score(prompts, completions)
    assert rs.score(prompts, completions, heldout=["x", "y"]).not_scored     # a column named heldout is a column


def test_recipe_wide_trl_reward_is_not_scored_on_sft_chat_rows_and_is_on_rl_rows(models, tmp_path, caplog):
    """Top-level ``rewards`` score every stage; the SFT rows ({"messages"}) have no ``answer``, so a
    reward that requires it is reported as not scored there (NaN, one warning), not a failed run."""
    from ccrl.evaluation import _tell_not_scored
    from ccrl.pipeline import run_recipe

    _tell_not_scored.cache_clear()
    rec = _recipe(tmp_path, models, "qwen2", council=False)
    rec["stages"] = rec["stages"][:2]
    del rec["stages"][1]["rewards"]
    rec["rewards"] = [{"name": "test_needs_answer"}, {"name": "exact_match", "weight": 0.5}]
    rec["stages"][0]["eval_every"] = 1                                        # held-out scoring at every step
    with caplog.at_level("WARNING", logger="ccrl.evaluation"):
        summary = run_recipe(rec, show_progress=False, log=lambda *a: None)
    sft, rl = (s["metrics"] for s in summary["stages"])
    assert math.isnan(sft["reward/test_needs_answer"]) and math.isnan(sft["reward/exact_match"])
    assert not math.isnan(rl["reward/test_needs_answer"]) and not math.isnan(rl["reward/exact_match"])
    told = [r.message for r in caplog.records if "is not scored" in r.message]
    assert told == ["stage 'sft': reward 'test_needs_answer' is not scored on these rows: it requires 'answer', "
                    "which these rows do not have (reward/test_needs_answer is NaN here; the stages whose rows "
                    "have its columns score it)"]


@rewards.register("test_reads_kwargs", override=True)
def reads_kwargs(prompts, completions, **kwargs):
    """The docs' example: columns read from ``kwargs``."""
    return [float(kwargs["answer"][i] in c[0]["content"]) + 0 * len(kwargs["topic"]) for i, c in enumerate(completions)]


def test_held_out_scoring_skips_a_kwargs_reward_that_fails_on_rows_lacking_its_columns():
    from ccrl.config.schema import RewardSpec
    from ccrl.scoring import RewardSet
    from rewards.errors import RewardError

    specs = [RewardSpec(name="test_reads_kwargs")]
    rs, training = RewardSet(specs, heldout=True), RewardSet(specs)
    completions, prompts = [[msg("assistant", "4")], [msg("assistant", "5")]], [[msg(USER, "2+2?")]] * 2
    ok = rs.score(prompts, completions, answer=["4", "4"], topic=["a", "b"])
    assert ok.per_reward["test_reads_kwargs"].tolist() == [1.0, 0.0] and ok.not_scored == {}
    sb = rs.score(prompts, completions, answer=["4", "4"])         # no 'topic' column
    assert sb.not_scored == {"test_reads_kwargs": "it reads 'topic', which these rows do not have"}
    sb = rs.score(prompts, completions, answer=[None, None], topic=["a", "b"])
    assert sb.not_scored["test_reads_kwargs"].startswith("it raised TypeError (") and "no 'answer'" in sb.not_scored[
        "test_reads_kwargs"]
    with pytest.raises(RewardError, match="raised KeyError"):                         # training: raised as always
        training.score(prompts, completions, answer=["4", "4"])
    with pytest.raises(RewardError, match="raised TypeError"):   # rows with answers: the reward's own error
        rs.score(prompts, completions, answer=[4, 4], topic=["a", "b"])
