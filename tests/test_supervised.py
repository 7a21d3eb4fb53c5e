"""Pretrain/SFT: completion-only loss, micro-batch invariance, and a run that learns."""

from __future__ import annotations

import json

import torch

from ccrl.data import default_tokenizer
from ccrl.pipeline import run_recipe
from ccrl.trainers.supervised import masked_nll_sum, sft_batch


def test_sft_loss_ignores_prompt_labels():
    tok = default_tokenizer()
    ids, mask, loss_mask = sft_batch(tok, ["12+3=", "7+7="], ["15", "14"])
    assert loss_mask.sum().item() == 2 * 3                            # "15"+eos, "14"+eos
    assert tok.decode(ids[0][loss_mask[0].bool()][:-1]) == "15"
    torch.manual_seed(0)
    logits = torch.randn(ids.shape[0], ids.shape[1], len(tok))
    base = masked_nll_sum(logits, ids, loss_mask)
    changed = ids.clone()
    prompt = (loss_mask == 0) & (mask == 1)
    changed[prompt] = (changed[prompt] + 5) % len(tok)                # different prompt-token labels
    assert torch.equal(masked_nll_sum(logits, changed, loss_mask), base)
    # hand check of one term: −log softmax(logits[0, t])[label[t+1]] summed over counted positions
    lp = torch.log_softmax(logits, -1)
    manual = -sum(lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(ids.shape[1] - 1) if loss_mask[b, t + 1])
    assert torch.allclose(base, manual, atol=1e-5)


def test_micro_batches_give_the_same_update(tmp_path, tiny_recipe):
    whole = tiny_recipe(output_dir=str(tmp_path / "a"))
    whole["stages"] = whole["stages"][:1]
    micro = tiny_recipe(output_dir=str(tmp_path / "b"))
    micro["stages"] = micro["stages"][:1]
    micro["stages"][0]["micro_batch_size"] = 3
    run_recipe(whole, show_progress=False, log=lambda *_: None)
    run_recipe(micro, show_progress=False, log=lambda *_: None)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 4 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (la, lb)


def test_pipeline_writes_summary_and_learns(tmp_path, tiny_recipe):
    rec = tiny_recipe(output_dir=str(tmp_path / "run"))
    rec["stages"][0]["steps"] = 30
    rec["stages"][1]["steps"] = 30
    summary = run_recipe(rec, show_progress=False, log=lambda *_: None)
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [s["kind"] for s in summary["stages"]] == ["pretrain", "sft"]
    for s in summary["stages"]:
        assert 0.0 <= s["metrics"]["heldout_accuracy"] <= 1.0
        assert (out / s["name"] / "model.safetensors").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"stage", "step", "loss", "step_time_s", "lr", "tokens_per_s"} <= set(lines[0])
    pre = [x["loss"] for x in lines if x["stage"] == "pretrain"]
    assert sum(pre[-5:]) / 5 < 0.7 * sum(pre[:5]) / 5                # the loss falls
