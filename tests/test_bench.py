"""The benchmark scripts run end to end on the CPU at a tiny size (both sides of bench/rl_step.py,
bench/decode_floor.py, bench/train_step.py), so the GPU commands documented in BENCHMARKS.md run the code tested here."""

from __future__ import annotations

import importlib
import sys

import pytest


def _bench(monkeypatch, name: str):
    """Import ``bench.<name>`` (its import puts the repository root first on ``sys.path``, undone after the test)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    return importlib.import_module(f"bench.{name}")


TINY = ["--model", "llama", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--intermediate", "64", "--vocab", "300"]


def test_rl_step_bench_runs_both_sides_with_a_real_vocabulary_tokenizer(monkeypatch, capsys):
    rl_step = _bench(monkeypatch, "rl_step")
    argv = TINY + ["--steps", "1", "--warmup", "1", "--repeats", "2", "--prompts", "2", "--group", "2",
                   "--max-new-tokens", "4", "--rewards", "digit_share", "--sides", "trl,ccrl",
                   "--micro-batch-size", "2", "--logprob-chunk-size", "3", "--gradient-checkpointing"]
    assert rl_step.main(argv) == 0
    out = capsys.readouterr().out
    assert "vocabulary 300" in out and "tokenizer of 300 tokens" in out
    assert "repeat 1/2 (trl, ccrl)" in out and "repeat 2/2 (ccrl, trl)" in out      # the order alternates
    line = next(x for x in out.splitlines() if "repeat 1/2" in x)       # a stopped run still shows these
    assert "ccrl" in line and "rollout " in line and "rows trained " in line
    rows = [line for line in out.splitlines() if line.startswith("| digit_share")]
    assert len(rows) == 2 and "TRL 1.16 GRPOTrainer" in rows[0] and "ccrl RLTrainer" in rows[1]
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert cells[6] == "2"                                                 # one timed step per repeat, pooled
    assert cells[-1].count("x") == 2                                       # the speed-up of each repeat


def test_rl_step_bench_runs_the_ccrl_side_alone(monkeypatch, capsys):
    """Without trl in --sides: the ccrl side's times alone (a memory check at a size TRL would take long
    at), no ratio columns filled; an unknown side is refused."""
    rl_step = _bench(monkeypatch, "rl_step")
    argv = TINY + ["--steps", "1", "--warmup", "1", "--prompts", "2", "--group", "2", "--max-new-tokens", "4",
                   "--rewards", "digit_share", "--sides", "ccrl", "--repeats", "2"]
    assert rl_step.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| digit_share")]
    assert len(rows) == 1 and "ccrl RLTrainer" in rows[0]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[6] == "2" and cells[-1] == cells[-2] == cells[-3] == ""
    with pytest.raises(SystemExit):
        rl_step.main(TINY + ["--sides", "ccrl,vllm"])


def test_rl_step_bench_sides_set_their_stage_keys(monkeypatch, capsys):
    """ccrl+sdpa and ccrl+whole-cache run ccrl's recipe with decode_kernel: sdpa and attend_window: 0."""
    rl_step = _bench(monkeypatch, "rl_step")
    import ccrl.pipeline

    stages = []
    real = ccrl.pipeline.run_recipe

    def spy(recipe, **kw):
        stages.append(dict(recipe["stages"][0]))
        return real(recipe, **kw)

    monkeypatch.setattr(ccrl.pipeline, "run_recipe", spy)
    argv = TINY + ["--steps", "1", "--warmup", "1", "--prompts", "2", "--group", "2", "--max-new-tokens", "4",
                   "--rewards", "char_share", "--sides", "ccrl,ccrl+sdpa,ccrl+whole-cache"]
    assert rl_step.main(argv) == 0
    assert [(st.get("decode_kernel"), st.get("attend_window")) for st in stages] == [(None, None), ("sdpa", None),
                                                                                     (None, 0)]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| char_share")]
    assert [r.split("|")[2].strip() for r in rows] == ["ccrl RLTrainer (grpo)", "ccrl, decode_kernel=sdpa",
                                                       "ccrl, attend_window=0"]


def test_padded_tokenizer_has_the_size_asked_and_encodes_prompts_as_the_char_tokenizer(monkeypatch):
    common = _bench(monkeypatch, "common")
    from ccrl.data import default_tokenizer

    tok = common.padded_tokenizer(1000)
    assert len(tok) == 1000 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.encode("12+34=", add_special_tokens=False) == default_tokenizer().encode("12+34=", add_special_tokens=False)
    filler = tok.decode([999])
    assert filler.startswith("<") and not any(ch.isdigit() for ch in filler)
    with pytest.raises(ValueError):
        common.padded_tokenizer(10)


def test_char_share_gives_reward_variance_where_digit_share_gives_none(monkeypatch):
    """Completions drawn uniformly over a 32,000-token vocabulary (what an untrained model samples):
    digit_share scores nearly all of them 0, so most groups of 8 have no reward variance; char_share
    gives every group variance, so ccrl trains every row, as TRL does."""
    common = _bench(monkeypatch, "common")
    import torch

    tok = common.padded_tokenizer(32000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (64, 8, 64), generator=g)          # 64 groups × 8 completions × 64 tokens
    texts = [[tok.decode(row) for row in group] for group in ids.tolist()]

    def groups_with_variance(fn):
        return sum(len(set(fn(None, group))) > 1 for group in texts)

    assert groups_with_variance(common.char_share) == 64
    assert groups_with_variance(common.digit_share) < 32
    assert common.char_share(None, ["a1z+", ""]) == [0.5, 0.0]          # a and 1 of a, 1, z, +


def test_rl_step_bench_says_when_ccrl_trained_fewer_rows_than_trl(monkeypatch):
    rl_step = _bench(monkeypatch, "rl_step")
    results = {"digit_share": {"trl": {"trained": []}, "ccrl": {"trained": [0.25, 0.5]}},
               "char_share": {"trl": {"trained": []}, "ccrl": {"trained": [1.0, 0.875]}}}
    notes = rl_step.unequal_work_notes(results, ["trl", "ccrl"])
    assert len(notes) == 1 and "NOT LIKE FOR LIKE" in notes[0] and "digit_share trained 0.38 (min 0.25)" in notes[0]
    assert rl_step.rows_trained([1.0, 1.0]) == "1.00" and rl_step.rows_trained([]) == "n/a"


@pytest.mark.parametrize("dtype", ["bf16", "autocast"])
def test_decode_floor_bench_times_the_engine_step_against_its_floor(monkeypatch, capsys, dtype):
    decode_floor = _bench(monkeypatch, "decode_floor")
    argv = ["--device", "cpu", "--model", "llama", "--hidden", "32", "--layers", "1", "--heads", "2",
            "--intermediate", "64", "--vocab", "500", "--rows", "4", "--context", "16", "--steps", "2",
            "--repeats", "2", "--warmup", "1", "--bandwidth-bytes", "4000000", "--dtype", dtype]
    assert decode_floor.main(argv) == 0
    out = capsys.readouterr().out
    assert "floor:" in out and "bandwidth: measured" in out
    parts = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in out.splitlines() if line.startswith("|") and "---" not in line}
    assert {"step", "feed", "sample"} <= set(parts)
    assert float(parts["step"][5]) > 0                                     # step / floor


def test_decode_floor_counts_the_weights_a_step_reads(monkeypatch):
    import torch

    decode_floor = _bench(monkeypatch, "decode_floor")
    from tests.test_logprob_chunks import _llama

    tied, untied = _llama(vocab=100, tie_word_embeddings=True), _llama(vocab=100, tie_word_embeddings=False)
    total = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert decode_floor.weight_bytes(tied, rows=3) == total(tied)          # the head reads the whole matrix
    emb = untied.get_input_embeddings().weight
    assert decode_floor.weight_bytes(untied, rows=3) == total(untied) - emb.numel() * 4 + 3 * emb.shape[1] * 4
    # under bf16 autocast the linear weights (the head too) are read as bf16 copies, the rest as stored
    linear = sum(m.weight.numel() for m in untied.modules() if type(m) is torch.nn.Linear)
    want = total(untied) - emb.numel() * 4 + 3 * emb.shape[1] * 4 - linear * 2
    assert decode_floor.weight_bytes(untied, rows=3, linear_dtype=torch.bfloat16) == want
    linear_tied = sum(m.weight.numel() for m in tied.modules() if type(m) is torch.nn.Linear
                      and m.weight is not tied.get_input_embeddings().weight)
    want = total(tied) - (linear_tied + tied.get_input_embeddings().weight.numel()) * 2
    assert decode_floor.weight_bytes(tied, rows=3, linear_dtype=torch.bfloat16) == want


@pytest.mark.slow
def test_decode_floor_bench_compiles_the_step(monkeypatch, capsys):
    decode_floor = _bench(monkeypatch, "decode_floor")
    argv = ["--device", "cpu", "--model", "llama", "--hidden", "32", "--layers", "1", "--heads", "2",
            "--intermediate", "64", "--vocab", "500", "--rows", "4", "--context", "16", "--steps", "2",
            "--repeats", "1", "--warmup", "1", "--bandwidth-bytes", "4000000", "--dtype", "fp32",
            "--compile", "--compile-mode", "default"]
    assert decode_floor.main(argv) == 0
    out = capsys.readouterr().out
    assert " compiled step |" in out and "--compile:" not in out


def test_train_step_bench_times_the_three_forms_of_the_quillan_step(monkeypatch, capsys):
    train_step = _bench(monkeypatch, "train_step")
    train_step.main(["--recipe", "recipes/quickstart.yaml", "--batch", "4", "--seq", "6", "--warmup", "0",
                     "--steps", "1", "--trials", "2"])
    out = capsys.readouterr().out
    rows = {c[1].strip(): c for c in (line.split("|") for line in out.splitlines()) if len(c) > 5}
    assert set(train_step.VARIANTS) <= set(rows)
    assert rows["gathered+foreach"][5].strip() == "1.00 / 1.00 / 1.00"
    assert "6,241,152 parameters" in out and "2 trials x 1 steps" in out


def test_train_step_bench_takes_model_fields(monkeypatch, capsys):
    train_step = _bench(monkeypatch, "train_step")
    train_step.main(["--batch", "2", "--seq", "4", "--warmup", "0", "--steps", "1", "--trials", "1",
                     "--model-set", "micro_agents=16"])
    out = capsys.readouterr().out
    assert "with micro_agents=16" in out and "6,241,152 parameters" not in out
