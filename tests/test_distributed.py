"""Two processes (DDP over gloo, on the CPU) against one.

The update a step makes must not depend on how many processes share the step. For the RL
objectives (grpo with batch-std advantages; dapo with its token normaliser and one process that
has no row to train; ccrl on a Quillan toy with routes replayed, noaux_bias load counts and a
12/4 split of the rows), SFT, DPO and ORPO, the gradient that two processes hold after their
backward passes (each on its own share of the step, DDP averaging) is compared with the gradient
of one process on the whole step; the logged metrics must be the whole step's too. Gradients,
not parameters: AdamW's first update is about lr·sign(g), which would hide a wrong scale. A run
interrupted under two processes writes one checkpoint and one metrics line per step, and
resumes in one process with its optimizer state.

The two processes are started once for the module (``torch.multiprocessing.start_processes``,
given up after ``DEADLINE_S`` so a deadlock fails instead of hanging); each case builds the same
trainer from the same recipe in the parent and in both workers.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

import rewards
from tests.conftest import TINY_LLAMA

WORLD = 2
DEADLINE_S = 300


@rewards.register("test_dist_digits", override=True)   # tests/test_fsdp.py imports this module again
def digit_fraction(prompts, completions, **kwargs):
    """Share of digit characters in the completion."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def _data(n=100):
    return {"task": "arithmetic", "options": {"digits": 1, "ops": "+"}, "num_examples": n, "heldout_size": 4}


def _recipe(out: Path, stage: dict) -> dict:
    stage = dict(stage)
    model = stage.pop("model", None) or {"hf_config": copy.deepcopy(TINY_LLAMA)}
    return {"name": "dist", "seed": 0, "output_dir": str(out), "model": model, "eval": {"max_new_tokens": 4},
            "stages": [stage]}


def _rl_stage(objective: str, **kw) -> dict:
    st = {"kind": "rl", "objective": objective, "data": _data(), "steps": 1, "lr": 1e-3, "prompts_per_step": 4,
          "group_size": 4, "max_new_tokens": 4, "rewards": [{"name": "test_dist_digits"}]}
    st.update(kw)
    return st


CASES = {
    "grpo": _rl_stage("grpo", scale_rewards="batch"),
    "dapo": _rl_stage("dapo", micro_batch_size=3),
    # a Quillan council: routes replayed, council entropy bonus, router load counts summed over the
    # processes (noaux_bias); the load-balance loss is off because it is a function of each forward's
    # routing statistics (per process, as it is per micro-batch)
    "ccrl": _rl_stage("ccrl", model={"preset": "toy", "routing": "noaux_bias"}, router_aux_coef=0.0,
                      micro_batch_size=5),
    "sft": {"kind": "sft", "data": _data(), "steps": 1, "lr": 1e-3, "batch_size": 8, "micro_batch_size": 3},
    "dpo": {"kind": "dpo", "data": _data(), "steps": 1, "lr": 1e-3, "batch_size": 4, "beta": 0.5,
            "peft": {"r": 4, "alpha": 8}},
    "orpo": {"kind": "orpo", "data": _data(), "steps": 1, "lr": 1e-3, "batch_size": 4, "beta": 0.5},
}
SPLIT = {"ccrl": 12}
"""rows of the 16 that process 0 trains (default 8): 3 groups against 1, as dynamic sampling can leave
the processes, so process 1 runs one micro-batch of 4 rows and two idle passes against 5 + 5 + 2"""
PAIRS = [{"prompt": p, "chosen": c, "rejected": r, "split": "train"}   # chosen lengths 1, 2, 3, 5: every
         for p, c, r in [("1+2=", "3", "12"), ("9+9=", "18", "99"),       # split into halves has unequal
                         ("50+50=", "100", "5"), ("0+12345=", "12345", "")]]  # chosen tokens (ORPO's normaliser)
RL_METRICS = ("loss", "loss/policy", "clip_frac", "approx_kl", "reward", "reward_std", "frac_reward_zero_std",
              "accuracy", "completion_tokens", "entropy", "truncated_frac", "rows_trained_frac")


# --------------------------------------------------------------------------- building and capturing


def _trainer(rec: dict):
    """The trainer of the recipe's only stage, built as ``run_recipe`` builds it."""
    from ccrl.config import load_recipe
    from ccrl.pipeline import _accelerator, _context, _stage_model, _tokenizer, trainer_class

    r = load_recipe(rec)
    acc = _accelerator(r)
    tok = _tokenizer(r)
    stage = r.stages[0]
    ctx = _context(r, stage, 0, Path(r.output_dir), acc, tok, None, False)
    return trainer_class(stage.kind)(stage, _stage_model(r, stage, None, tok, 0), ctx)


def _prepare(name: str, trainer) -> None:
    if name in ("dpo", "orpo"):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():                       # LoRA B ≠ 0: the policy differs from the reference
            for pname, p in trainer.unwrapped.named_parameters():
                if "lora_B" in pname:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        trainer.use_pairs(PAIRS)


def _capture(trainer, run):
    """(gradients of the trainable parameters when the update would step, and the routers' load
    counts as the bias update would read them; metrics of ``run()``)."""
    grads = {}

    def step():
        for name, p in trainer.unwrapped.named_parameters():
            if p.requires_grad:
                grads[name] = p.grad.detach().clone()
        trainer._sum_router_load()
        for name, b in trainer.unwrapped.named_buffers():
            if name.endswith("load_counts"):
                grads[f"{name} (load)"] = b.clone()
        trainer.optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer.optimizer_step = step
    metrics = run()
    return grads, {k: v for k, v in metrics.items() if isinstance(v, float | int)}


def _update(name: str, trainer, batch):
    """One step of case ``name``: RL updates on the given batch, the others draw their step 0."""
    if batch is not None:
        return _capture(trainer, lambda: trainer.update(batch))
    return _capture(trainer, lambda: trainer.training_step(0))


def _rl_batch(trainer, name: str):
    batch = trainer.collect(0)
    half = batch.advantages.numel() // WORLD
    if name == "dapo":                              # nothing to train in the second half: idle passes there
        batch.advantages[half:] = 0.0
    return batch


# --------------------------------------------------------------------------- the two processes


def run_processes(worker, out: Path, attempts: int = 3) -> None:
    """``worker(rank, port, out)`` in WORLD spawned processes; a run past DEADLINE_S (a collective that
    never completes) fails the test instead of hanging it. The port is free when chosen but may be
    taken before rank 0 binds it: a start that fails with "address already in use" is retried on
    another port (``attempts`` in all); any other failure is raised."""
    for attempt in range(1, attempts + 1):
        try:
            _start(worker, _free_port(), out)
            return
        except torch.multiprocessing.ProcessRaisedException as err:
            text = str(err)
            if attempt == attempts or not ("EADDRINUSE" in text or "address already in use" in text.lower()):
                raise


def _start(worker, port: int, out: Path) -> None:
    ctx = torch.multiprocessing.start_processes(worker, args=(port, out), nprocs=WORLD, join=False,
                                                start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two processes did not finish within {DEADLINE_S} s (a deadlock between them?)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from ccrl.errors import RecipeError

    for name, stage in CASES.items():
        trainer = _trainer(_recipe(out / "runs" / name, stage))
        assert trainer.world_size == WORLD
        _prepare(name, trainer)
        batch = None
        if stage["kind"] == "rl":
            full = torch.load(out / f"{name}-batch.pt", weights_only=False)
            split = SPLIT.get(name, full.advantages.numel() // WORLD)
            batch = full.select(list(range(split)) if rank == 0 else list(range(split, full.advantages.numel())))
            adv = trainer.advantages(batch.value, ~batch.valid)      # batch std over both processes' rewards
            torch.save(adv, out / f"{name}-adv-{rank}.pt")
        torch.save(_update(name, trainer, batch), out / f"{name}-{rank}.pt")
    try:
        _trainer(_recipe(out / "runs" / "odd", _rl_stage("grpo", prompts_per_step=3)))
    except RecipeError as e:
        (out / f"odd-{rank}.txt").write_text(str(e))
    _interrupted_run(out / "resume")


def _resume_recipe(out: Path) -> dict:
    return _recipe(out, _rl_stage("dapo", steps=3, lr=1e-2, max_resample_tries=2))


def _interrupted_run(out: Path) -> None:
    from ccrl.pipeline import run_recipe
    from ccrl.trainers.base import StageInterrupted

    def stop(trainer, step, metrics):
        if step == 2:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(_resume_recipe(out), callbacks=[stop], show_progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Run every case in two processes; returns the directory of their results (and the RL batches)."""
    out = tmp_path_factory.mktemp("dist")
    refs = {}
    for name, stage in CASES.items():
        if stage["kind"] == "rl":
            trainer = _trainer(_recipe(out / "single" / name, stage))
            batch = _rl_batch(trainer, name)
            assert batch.advantages.numel() == 16      # 4 whole groups: 2 per process
            torch.save(batch, out / f"{name}-batch.pt")
            refs[name] = _update(name, trainer, batch)
    run_processes(_worker, out)
    return out, refs


def _single(out: Path, name: str, refs: dict):
    if name in refs:
        return refs[name]
    trainer = _trainer(_recipe(out / "single" / name, CASES[name]))
    _prepare(name, trainer)
    return _update(name, trainer, None)


def _assert_same_gradients(single: dict, multi: dict) -> None:
    assert single.keys() == multi.keys() and single
    total = torch.sqrt(sum(g.pow(2).sum() for k, g in single.items() if not k.endswith("(load)")))
    assert total > 1e-3                                   # a real gradient, not zeros on both sides
    for k, g in single.items():
        if k.endswith("(load)"):                          # routed tokens per persona: counts
            assert g.sum() > 0 and torch.equal(multi[k], g), k
            continue
        tol = 1e-5 * float(g.abs().max()) + 1e-9
        assert torch.allclose(multi[k], g, rtol=1e-5, atol=tol), (k, float((multi[k] - g).abs().max()), tol)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", ["grpo", "dapo", "ccrl"])
def test_rl_update_of_two_processes_equals_one(two, name):
    out, refs = two
    grads, metrics = _single(out, name, refs)
    r0, r1 = (torch.load(out / f"{name}-{r}.pt", weights_only=False) for r in range(WORLD))
    for g, m in (r0, r1):
        _assert_same_gradients(grads, g)
        for k in RL_METRICS:
            assert m[k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-6), k
    if name == "dapo":   # the second process trained on no row and ran idle passes
        assert metrics["rows_trained_frac"] == pytest.approx(0.5, abs=1e-9)
    if name == "ccrl":
        for k in ("council_entropy", "entropy_bonus", "council/max_alpha", "expert_load/entropy"):
            assert r0[1][k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-6), k
    batch = torch.load(out / f"{name}-batch.pt", weights_only=False)
    adv = torch.cat([torch.load(out / f"{name}-adv-{r}.pt") for r in range(WORLD)])
    if name == "grpo":   # recomputed in each process from its own half (batch std exchanged)
        assert torch.allclose(adv, batch.advantages, atol=1e-6)


@pytest.mark.parametrize("name", ["sft", "dpo", "orpo"])
def test_supervised_and_preference_step_of_two_processes_equals_one(two, name):
    out, refs = two
    grads, metrics = _single(out, name, refs)
    for r in range(WORLD):
        g, m = torch.load(out / f"{name}-{r}.pt", weights_only=False)
        _assert_same_gradients(grads, g)
        keys = ["loss"] + (["rewards/margins", "logps/chosen", "rewards/accuracies"] if name == "dpo" else []) \
            + (["nll_loss", "log_odds_ratio"] if name == "orpo" else [])
        for k in keys:
            assert m[k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-6), k
        assert m["_tokens"] == metrics["_tokens"]


def test_step_size_not_divisible_by_the_processes_is_a_recipe_error(two):
    out, _ = two
    for r in range(WORLD):
        msg = (out / f"odd-{r}.txt").read_text()
        assert "prompts_per_step=3 is not a multiple of the 2 processes" in msg


def test_checkpoint_of_two_processes_resumes_in_one(two):
    from ccrl.checkpoint import read_state
    from ccrl.pipeline import run_recipe

    out, _ = two
    run = out / "resume"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]                    # one line per step: the main process's
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("rl")) == ["rl-last"]
    meta, tensors = read_state(run / "rl-last")
    assert meta["step"] == 2 and meta["updates"] == 2
    steps = {k: float(v) for k, v in tensors.items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {2.0}                  # AdamW's step count, saved once

    run_recipe(_resume_recipe(run), resume=True, show_progress=False, log=lambda *_: None)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    meta, tensors = read_state(run / "rl")
    assert meta["step"] == 3 and meta["complete"]
    assert {float(v) for k, v in tensors.items() if k.endswith(".step")} == {3.0}  # continued, not restarted
    assert not (run / "rl-last").exists()
