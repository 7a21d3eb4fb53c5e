"""FSDP2 (accelerate's ``fully_shard``) in two processes (gloo, on the CPU) against one process.

The parameters, gradients and AdamW state are sharded over the two processes; each trains its
share of the step. For grpo (batch-std advantages), ccrl (a Quillan toy: routes replayed,
noaux_bias load counts summed, a 12/4 split of the rows), sft and dpo (LoRA adapters through
PEFT, the base frozen and sharded beside them), the gathered gradients, the weights after the
real update (gathered into the unsharded replica that rollouts and checkpoints read), the grad
norm and the logged metrics must equal those of one process on the whole step. Checkpoints:
a stage interrupted under FSDP2 (dapo: rollouts from the replica, dynamic sampling) resumes in
one process; an SFT stage interrupted in one process resumes under FSDP2, and its final
checkpoint (weights and optimizer state, gathered from the shards) equals that of an
uninterrupted one-process run. FSDP version 1 is refused with a RecipeError.

accelerate turns FSDP on only for accelerator devices: on the CPU ``AcceleratorState`` keeps
``MULTI_CPU`` whatever the launch config says. The workers therefore set the state that
``accelerate launch`` with ``distributed_type: FSDP`` / ``fsdp_version: 2`` gives on GPUs (the
distributed type and a ``FullyShardedDataParallelPlugin``, transformer-based wrapping), right
after each Accelerator is built; everything after that (``prepare``, ``no_sync``,
``clip_grad_norm_``, the state-dict gathering) is accelerate's and torch's FSDP2 code as on GPUs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_distributed import (
    CASES,
    PAIRS,
    RL_METRICS,
    SPLIT,
    WORLD,
    _assert_same_gradients,
    _data,
    _interrupted_run,
    _recipe,
    _resume_recipe,
    run_processes,
)

NAMES = ("grpo", "ccrl", "sft", "dpo")
ADAM_EPSILON = 1e-3
"""the cases' AdamW ε here: the first update lr·g/(|g| + ε) then follows the gradient's size, not only
its sign, and moves a weight by at most lr/ε = 1 times its gradient's rounding (with torch's 1e-8 a
gradient entry near ε moves its weight by up to 1e5 times its rounding: a different CPU's matmul
kernels then fail a comparison of weights while the gradients agree)"""


def _case(name: str) -> dict:
    return {**CASES[name], "adam_epsilon": ADAM_EPSILON}


def _sft_resume_recipe(out: Path) -> dict:
    return _recipe(out, {"kind": "sft", "data": _data(), "steps": 3, "lr": 1e-2, "batch_size": 4,
                         "max_grad_norm": 0.0})


# --------------------------------------------------------------------------- FSDP2 on the CPU


def _use_fsdp(version: int = 2) -> None:
    """Make every Accelerator the pipeline builds in this process an FSDP one (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import ccrl.pipeline as pl

    make = getattr(pl._accelerator, "plain", pl._accelerator)

    def fsdp_accelerator(rec):
        acc = make(rec)
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP   # as AcceleratorState does
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=version,
                                                               auto_wrap_policy="transformer_based_wrap")
        return acc

    fsdp_accelerator.plain = make
    pl._accelerator = fsdp_accelerator


def _trainer(rec: dict, name: str):
    """The trainer of the recipe's only stage, built as ``run_recipe`` builds it; dpo gets LoRA B ≠ 0
    (set before sharding, so the policy differs from the reference) and the fixed pairs."""
    import ccrl.pipeline as pl
    from ccrl.config import load_recipe

    r = load_recipe(rec)
    acc = pl._accelerator(r)
    tok = pl._tokenizer(r)
    stage = r.stages[0]
    ctx = pl._context(r, stage, 0, Path(r.output_dir), acc, tok, None, False)
    model = pl._stage_model(r, stage, None, tok, 0)
    if name == "dpo":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    trainer = pl.trainer_class(stage.kind)(stage, model, ctx)
    if name == "dpo":
        trainer.use_pairs(PAIRS)
    return trainer


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _step(name: str, trainer, batch):
    """(gathered gradients and summed router load counts at the update, trainable weights after
    the real update, metrics) of one step of case ``name``."""
    grads = {}
    real_step = trainer.optimizer_step

    def step():
        for pname, p in trainer.unwrapped.named_parameters():
            if p.requires_grad:
                grads[pname] = _full(p.grad)
        for bname, b in trainer.unwrapped.named_buffers():
            if bname.endswith("load_counts"):
                b = b.clone()
                if trainer.world_size > 1:
                    torch.distributed.all_reduce(b)
                grads[f"{bname} (load)"] = b
        return real_step()

    trainer.optimizer_step = step
    metrics = trainer.update(batch) if batch is not None else trainer.training_step(0)
    trainer.gather_full_weights()
    weights = {k: p.detach().clone() for k, p in trainer.full_model.named_parameters() if k in grads}
    return grads, weights, {k: v for k, v in metrics.items() if isinstance(v, float | int)}


# --------------------------------------------------------------------------- the two processes


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule

    from ccrl.errors import RecipeError
    from ccrl.pipeline import run_recipe

    _use_fsdp()
    for name in NAMES:
        trainer = _trainer(_recipe(out / "runs" / name, _case(name)), name)
        assert trainer.world_size == WORLD and trainer.fsdp and isinstance(trainer.unwrapped, FSDPModule)
        batch = None
        if CASES[name]["kind"] == "rl":
            full = torch.load(out / f"{name}-batch.pt", weights_only=False)
            split = SPLIT.get(name, full.advantages.numel() // WORLD)
            rows = list(range(split)) if rank == 0 else list(range(split, full.advantages.numel()))
            batch = full.select(rows)
        torch.save(_step(name, trainer, batch), out / f"{name}-{rank}.pt")
    _interrupted_run(out / "resume")                                  # dapo, stopped at step 2 under FSDP2
    run_recipe(_sft_resume_recipe(out / "resume-sft"), resume=True, show_progress=False, log=lambda *_: None)
    _use_fsdp(version=1)
    try:
        _trainer(_recipe(out / "runs" / "fsdp1", CASES["sft"]), "sft")
    except RecipeError as e:
        (out / f"fsdp1-{rank}.txt").write_text(str(e))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One-process references (RL batches, an uninterrupted and an interrupted SFT run), then every
    case in two FSDP2 processes; returns the directory of their results and the references."""
    from ccrl.pipeline import run_recipe
    from ccrl.trainers.base import StageInterrupted

    out = tmp_path_factory.mktemp("fsdp")
    refs = {}
    for name in NAMES:
        trainer = _trainer(_recipe(out / "single" / name, _case(name)), name)
        batch = None
        if CASES[name]["kind"] == "rl":
            batch = trainer.collect(0)
            torch.save(batch, out / f"{name}-batch.pt")
        refs[name] = _step(name, trainer, batch)
    quiet = {"show_progress": False, "log": lambda *_: None}
    run_recipe(_sft_resume_recipe(out / "straight-sft"), **quiet)

    def stop(trainer, step, metrics):
        if step == 2:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(_sft_resume_recipe(out / "resume-sft"), callbacks=[stop], **quiet)
    run_processes(_worker, out)
    return out, refs


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_step_of_two_processes_equals_one(two, name):
    out, refs = two
    grads, weights, metrics = refs[name]
    keys = {"grpo": RL_METRICS, "ccrl": RL_METRICS + ("council_entropy", "entropy_bonus", "expert_load/entropy"),
            "sft": ("loss",), "dpo": ("loss", "rewards/margins", "logps/chosen", "rewards/accuracies")}[name]
    for r in range(WORLD):
        g, w, m = torch.load(out / f"{name}-{r}.pt", weights_only=False)
        _assert_same_gradients(grads, g)
        assert w.keys() == weights.keys() and weights
        for k, p in weights.items():   # ε = ADAM_EPSILON: the update follows the gradient (rounding × 1)
            assert torch.allclose(w[k], p, rtol=1e-5, atol=1e-6), (k, float((w[k] - p).abs().max()))
        for k in keys + ("grad_norm",):
            assert m[k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-6), k


def test_checkpoint_of_fsdp_resumes_in_one_process(two):
    from ccrl.checkpoint import read_state
    from ccrl.pipeline import run_recipe

    out, _ = two
    run = out / "resume"
    meta, tensors = read_state(run / "rl-last")
    assert meta["step"] == 2 and {float(v) for k, v in tensors.items() if k.endswith(".step")} == {2.0}
    run_recipe(_resume_recipe(run), resume=True, show_progress=False, log=lambda *_: None)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    meta, tensors = read_state(run / "rl")
    assert meta["step"] == 3 and meta["complete"]
    assert {float(v) for k, v in tensors.items() if k.endswith(".step")} == {3.0}


def test_one_process_checkpoint_resumes_under_fsdp_as_if_uninterrupted(two):
    from safetensors.torch import load_file

    from ccrl.checkpoint import read_state

    out, _ = two
    straight, resumed = out / "straight-sft" / "sft", out / "resume-sft" / "sft"
    lines = [json.loads(x) for x in (out / "resume-sft" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]                # the third written once, by the main process
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, float((a[k] - b[k]).abs().max()))
    (_, ta), (mb, tb) = read_state(straight), read_state(resumed)
    assert mb["step"] == 3 and mb["complete"]
    opt = [k for k in ta if k.startswith("optim.")]
    assert opt and sorted(opt) == sorted(k for k in tb if k.startswith("optim."))
    for k in opt:                                                  # whole AdamW moments, in one-process layout
        assert ta[k].shape == tb[k].shape and torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-8), k


def test_fsdp_version_1_is_a_recipe_error(two):
    out, _ = two
    for r in range(WORLD):
        msg = (out / f"fsdp1-{r}.txt").read_text()
        assert "FSDP version 1 is not supported" in msg and "fsdp_version: 2" in msg
