"""DPO / IPO / ORPO trainer: loss by hand, frozen base under LoRA, the adapter-disabled reference,
learning a trivial preference, self-generated pairs through the pipeline (resume reuses them),
merged export, and bad preference files."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from ccrl.config import DataConfig, PeftConfig, PreferenceStage
from ccrl.data import default_tokenizer
from ccrl.errors import DataError
from ccrl.objectives import dpo_loss, orpo_loss
from ccrl.pipeline import apply_peft, run_recipe
from ccrl.trainers.base import RunContext
from ccrl.trainers.preference import PreferenceTrainer
from tests.conftest import TINY_LLAMA

QUIET = {"show_progress": False, "log": lambda *_: None}


def _tiny_llama(tok, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    cfg = AutoConfig.for_model("llama", **cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def _quillan_toy(tok, seed=0):
    from policies import QuillanConfig, QuillanForCausalLM

    torch.manual_seed(seed)
    return QuillanForCausalLM(QuillanConfig.preset("toy", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))


def _trainer(tmp_path, kind="dpo", peft=True, build=_tiny_llama, **stage_kw):
    """(trainer, tokenizer, a frozen copy of the starting base model)."""
    from accelerate import Accelerator

    tok = default_tokenizer()
    model = build(tok)
    base = copy.deepcopy(model).eval()
    stage_kw.setdefault("batch_size", 4)
    stage = PreferenceStage(kind=kind, name=kind, data=DataConfig(task="arithmetic"), lr=1e-2,
                            peft=PeftConfig(r=4, alpha=8) if peft else None, **stage_kw)
    if peft:
        model = apply_peft(model, stage.peft)
    ctx = RunContext(output_dir=tmp_path, seed=0, stage_index=0, stage_name=kind, accelerator=Accelerator(cpu=True),
                     tokenizer=tok, show_progress=False)
    return PreferenceTrainer(stage, model, ctx), tok, base


def _pairs(n, split="train", seed=0):
    """Prompts of random digits; the preferred completion is always "yes", the other "no"."""
    rng = random.Random(f"{split}{seed}")
    return [{"prompt": "".join(rng.choice("0123456789") for _ in range(4)) + "=", "chosen": "yes",
             "rejected": "no", "split": split} for _ in range(n)]


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _seq_logp(model, tok, prompt, completion):
    """Σ log p of completion + EOS given the prompt: one unpadded sequence, plain log_softmax."""
    p = tok.encode(prompt, add_special_tokens=False)
    c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = range(len(p) - 1, len(p) + len(c) - 1)
    return sum(float(lp[t, ids[0, t + 1]]) for t in pos), len(c)


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _base_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}


# --------------------------------------------------------------------------- the loss, by hand


@pytest.mark.parametrize("kind,loss_type,micro,nll_weight", [("dpo", "sigmoid", None, 0.0), ("dpo", "sigmoid", 1, 0.0),
                                                             ("dpo", "ipo", 3, 0.0), ("dpo", "sigmoid", 3, 0.7),
                                                             ("orpo", "sigmoid", 1, 0.0)])
def test_loss_equals_objective_on_independent_logprobs(tmp_path, kind, loss_type, micro, nll_weight):
    trainer, tok, base = _trainer(tmp_path, kind=kind, loss_type=loss_type, micro_batch_size=micro, beta=0.5,
                                  nll_weight=nll_weight)
    rows = [{"prompt": "12+3=", "chosen": "15", "rejected": "7", "split": "train"},
            {"prompt": "4+4=", "chosen": "8", "rejected": "44", "split": "train"},
            {"prompt": "9-2=", "chosen": "7", "rejected": "", "split": "train"},
            {"prompt": "1+1=", "chosen": "2", "rejected": "11+1", "split": "train"}]
    _randomise_lora(trainer.unwrapped)                       # policy ≠ reference
    trainer.use_pairs(rows)
    policy = trainer.unwrapped.eval()
    pairs = [rows[i] for i in trainer.batch_indices(0)]
    pc, pcn = zip(*[_seq_logp(policy, tok, r["prompt"], r["chosen"]) for r in pairs])
    pr, prn = zip(*[_seq_logp(policy, tok, r["prompt"], r["rejected"]) for r in pairs])
    rc = [_seq_logp(base, tok, r["prompt"], r["chosen"])[0] for r in pairs]
    rr = [_seq_logp(base, tok, r["prompt"], r["rejected"])[0] for r in pairs]
    T = lambda x: torch.tensor(x, dtype=torch.float32)
    if kind == "dpo":
        want, _ = dpo_loss(T(pc), T(pr), T(rc), T(rr), beta=0.5, loss_type=loss_type,
                           chosen_lengths=T(pcn), rejected_lengths=T(prn))
        want = want + nll_weight * -sum(pc) / sum(pcn)      # RPO: + w · token-mean NLL of the chosen
    else:
        nll = -sum(pc) / sum(pcn)                            # token mean over every chosen token
        want, _ = orpo_loss(T(pc) / T(pcn), T(pr) / T(prn), T(nll), beta=0.5)
    policy.train()
    metrics = trainer.training_step(0)
    assert metrics["loss"] == pytest.approx(float(want), abs=2e-5)
    assert metrics["logps/chosen"] == pytest.approx(sum(pc) / 4 if kind == "dpo" else float((T(pc) / T(pcn)).mean()),
                                                    abs=2e-5)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/rejected",
            "grad_norm"} <= set(metrics)


# --------------------------------------------------------------------------- PEFT invariants


@pytest.mark.parametrize("build", [_tiny_llama, _quillan_toy], ids=["llama", "quillan"])
def test_base_frozen_lora_trained_and_reference_is_the_base(tmp_path, build):
    from peft.tuners.lora import LoraLayer

    from policies.ternary import BitLinear

    trainer, tok, base = _trainer(tmp_path, batch_size=4, build=build)
    trainer.use_pairs(_pairs(12) + _pairs(4, "heldout"))
    model = trainer.unwrapped
    if build is _quillan_toy:                                       # LoRA wraps ternary BitLinear layers too
        assert any(isinstance(m.base_layer, BitLinear) for m in model.modules() if isinstance(m, LoraLayer))
    base0, lora0 = _base_state(model), _lora_state(model)
    for step in range(3):
        trainer.training_step(step)
    for k, v in _base_state(model).items():
        assert torch.equal(v, base0[k]), f"base weight {k} changed"
    changed = [k for k, v in _lora_state(model).items() if not torch.equal(v, lora0[k])]
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)
    # the adapter-disabled reference is the base model, after the adapters have moved
    rows = _pairs(3, "heldout", seed=5)
    ref = trainer.reference_logprobs(rows)
    want = [_seq_logp(base, tok, r["prompt"], r["chosen"])[0] for r in rows] + \
           [_seq_logp(base, tok, r["prompt"], r["rejected"])[0] for r in rows]
    assert torch.allclose(ref, torch.tensor(want), atol=1e-5), (ref, want)
    pol, _ = trainer.policy_logprobs(rows)
    assert not torch.allclose(pol, ref, atol=1e-3)                 # the adapters do change the policy


def test_no_training_pairs_is_a_clear_error(tmp_path):
    trainer, _, _ = _trainer(tmp_path)
    with pytest.raises(DataError, match="no training preference pairs"):
        trainer.use_pairs(_pairs(3, "heldout"))


def test_without_peft_the_reference_is_a_frozen_copy_freed_after_caching(tmp_path):
    trainer, tok, base = _trainer(tmp_path, peft=False)
    assert trainer.ref_model is not None
    trainer.use_pairs(_pairs(8) + _pairs(2, "heldout"))
    assert trainer.ref_model is None                              # log-probs cached, copy dropped
    trainer.training_step(0)
    rows = trainer.heldout_pairs
    want = [_seq_logp(base, tok, r["prompt"], r["chosen"])[0] for r in rows] + \
           [_seq_logp(base, tok, r["prompt"], r["rejected"])[0] for r in rows]
    assert torch.allclose(trainer._ref["heldout"], torch.tensor(want), atol=1e-5)


def test_cached_and_per_batch_reference_agree(tmp_path):
    a, _, _ = _trainer(tmp_path / "a")
    b, _, _ = _trainer(tmp_path / "b")
    b.cache_reference = False
    rows = _pairs(8) + _pairs(2, "heldout")
    a.use_pairs(rows)
    b.use_pairs(rows)
    for step in range(2):
        ma, mb = a.training_step(step), b.training_step(step)
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_heldout_preference_accuracy_rises(tmp_path, kind):
    trainer, _, _ = _trainer(tmp_path, kind=kind, batch_size=8, beta=0.5 if kind == "dpo" else 1.0)
    trainer.use_pairs(_pairs(32) + _pairs(16, "heldout"))
    before = trainer.heldout_preference()["preference_accuracy"]
    for step in range(12):
        trainer.training_step(step)
    after = trainer.final_metrics()
    assert after["preference_accuracy"] >= 0.9 and after["preference_accuracy"] > before, (before, after)
    assert after["pairs"] == 32 and after["heldout_pairs"] == 16


# --------------------------------------------------------------------------- the pipeline


def _recipe(tmp_path, **dpo):
    stage = {"kind": "dpo", "steps": 4, "lr": 1e-2, "batch_size": 4, "micro_batch_size": 2,
             "peft": {"r": 4, "alpha": 8},
             "pairs": {"num_prompts": 16, "group_size": 4, "max_new_tokens": 4, "heldout_pairs": 6}}
    stage.update(dpo)
    return {"name": "pref", "seed": 0, "output_dir": str(tmp_path), "model": {"hf_config": dict(TINY_LLAMA)},
            "eval": {"max_new_tokens": 4, "batch_size": 64},
            # ice (length cost) separates completions even when an untrained model gets every answer wrong
            "rewards": [{"name": "exact_match"}, {"name": "ice", "weight": 0.1}],
            "stages": [{"kind": "sft", "data": {"task": "arithmetic", "options": {"digits": 1, "ops": "+"},
                                                "num_examples": 200, "heldout_size": 16},
                        "steps": 2, "lr": 3e-3, "batch_size": 8}, stage]}


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pref") / "a"
    return out, run_recipe(_recipe(out), **QUIET)


def test_self_generated_pairs_through_the_pipeline(straight_run):
    out, summary = straight_run
    m = summary["stages"][-1]["metrics"]
    assert 0.0 <= m["preference_accuracy"] <= 1.0 and m["pairs"] > 0 and m["heldout_pairs"] > 0
    assert m["preference_accuracy_start"] == 0.0                   # policy = reference at the start
    assert "heldout_accuracy" in m
    rows = [json.loads(x) for x in (out / "dpo-pairs.jsonl").read_text().splitlines()]
    assert all(r["chosen_value"] > r["rejected_value"] and r["chosen"] != r["rejected"] for r in rows)
    assert {r["split"] for r in rows} == {"train", "heldout"}
    assert len(rows) == m["pairs"] + m["heldout_pairs"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [x for x in lines if x["stage"] == "dpo"]
    assert len(dpo) == 4 and {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                              "logps/chosen", "logps/rejected"} <= set(dpo[0])


def test_resume_reuses_the_pairs_and_equals_uninterrupted(straight_run, tmp_path):
    from ccrl.trainers.base import StageInterrupted

    out_a, summary = straight_run

    def stop(trainer, step, metrics):
        if trainer.stage.name == "dpo" and step == 2:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(_recipe(tmp_path), callbacks=[stop], **QUIET)
    resumed = run_recipe(_recipe(tmp_path), resume=True, **QUIET)
    assert (tmp_path / "dpo-pairs.jsonl").read_text() == (out_a / "dpo-pairs.jsonl").read_text()
    strip = lambda d: [{k: v for k, v in x.items() if "time" not in k and k not in ("tokens_per_s", "elapsed_s")}
                       for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if x["stage"] == "dpo"]
    assert strip(tmp_path) == strip(out_a)
    ma, mb = summary["stages"][-1]["metrics"], resumed["stages"][-1]["metrics"]
    assert mb["preference_accuracy"] == ma["preference_accuracy"]
    assert mb["preference_accuracy_start"] == 0.0 and mb["pairs"] == ma["pairs"]


def test_stage_added_by_resume_equals_straight_run(straight_run, tmp_path):
    """The LoRA adapters are initialised from (seed, stage), not from whatever the stages before
    left in torch's generator: SFT alone, then the DPO stage added with resume, trains exactly
    what one straight run trains."""
    out_a, summary = straight_run
    first = _recipe(tmp_path)
    first["stages"] = first["stages"][:1]
    run_recipe(first, **QUIET)
    torch.manual_seed(1234)               # as in a new process: the generator is not where SFT left it
    resumed = run_recipe(_recipe(tmp_path), resume=True, **QUIET)
    assert (tmp_path / "dpo-pairs.jsonl").read_text() == (out_a / "dpo-pairs.jsonl").read_text()
    strip = lambda d: [{k: v for k, v in x.items() if "time" not in k and k not in ("tokens_per_s", "elapsed_s")}
                       for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if x["stage"] == "dpo"]
    assert strip(tmp_path) == strip(out_a)
    assert resumed["stages"][-1]["metrics"]["preference_accuracy"] == summary["stages"][-1]["metrics"]["preference_accuracy"]


def test_merged_export_gives_the_adapter_logits(straight_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ccrl.export import export_checkpoint
    from ccrl.models import load_policy

    ckpt = straight_run[0] / "dpo"
    assert (ckpt / "adapter").is_dir()
    ids = torch.tensor([[5, 9, 12, 3, 7, 1]])
    adapter, _ = load_policy(ckpt, merge_adapters=False)
    merged, _ = load_policy(ckpt, merge_adapters=True)
    la = _logits(adapter, ids)
    with adapter.disable_adapter():
        assert not torch.allclose(_logits(adapter, ids), la, atol=1e-4)   # the adapters matter
    assert torch.allclose(_logits(merged, ids), la, atol=1e-5)
    export_checkpoint(ckpt, tmp_path / "merged", merge=True)              # ccrl export CKPT OUT --merge
    assert not (tmp_path / "merged" / "adapter").exists()
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids), la, atol=1e-5)
    export_checkpoint(ckpt, tmp_path / "separate")                        # adapters kept, loadable with PEFT
    sep = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "separate"),
                                    tmp_path / "separate" / "adapter")
    assert torch.allclose(_logits(sep, ids), la, atol=1e-6)


# --------------------------------------------------------------------------- bad files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _file_recipe(tmp_path, data_path):
    return {"name": "pref-file", "output_dir": str(tmp_path / "run"), "model": {"hf_config": dict(TINY_LLAMA)},
            "stages": [{"kind": "dpo", "data": {"path": str(data_path)}, "steps": 1, "batch_size": 2,
                        "peft": {"r": 2, "alpha": 4}}]}


@pytest.mark.parametrize("bad,named", [({"rejected": ""}, ["row 3", "'rejected'", "empty"]),
                                       ({"chosen": None}, ["row 3", "'chosen'"])])
def test_bad_preference_row_exits_2_naming_the_row(tmp_path, capsys, bad, named):
    import yaml

    from ccrl.cli import main

    rows = _pairs(5)
    for r in rows:
        r.pop("split")
    rows[2].update(bad)
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_file_recipe(tmp_path, data)))
    assert main(["run", str(tmp_path / "r.yaml"), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and all(s in err for s in named), err


def test_missing_column_is_a_data_error_through_the_trainer(tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in _pairs(5)]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    trainer, _, _ = _trainer(tmp_path)
    trainer.stage.data = DataConfig(path=str(data))
    with pytest.raises(DataError, match="missing column 'rejected'"):
        trainer.prepare()


def test_file_pairs_train_through_the_pipeline(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _pairs(60)]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    rec = _file_recipe(tmp_path, data)
    rec["stages"][0].update(steps=3, pairs={"heldout_pairs": 4})
    summary = run_recipe(rec, **QUIET)
    m = summary["stages"][0]["metrics"]
    assert m["pairs"] + m["heldout_pairs"] <= 60 and m["pairs"] > 40
    written = [json.loads(x) for x in (tmp_path / "run" / "dpo-pairs.jsonl").read_text().splitlines()]
    assert len(written) == m["pairs"] + m["heldout_pairs"]
