"""The stages' optimizer: torch's AdamW, or AdamW on float32 master weights for bf16 parameters.

``optimizer_state_dtype`` (any stage) chooses the precision of AdamW's state:

- unset: torch's ``AdamW``, whose moments have the parameters' dtype. With bf16
  weights (``model.dtype: bfloat16``) that is 2 + 2 bytes of state per parameter, and the update
  itself is rounded into a bf16 weight, so a step smaller than about 2⁻⁸ of the weight is lost.
- ``float32`` with bf16 weights: :class:`MasterWeightAdamW` keeps a float32 master copy of each
  bf16 parameter and float32 moments (4 + 4 + 4 bytes per parameter), applies torch's own AdamW
  arithmetic (``torch.optim.adamw.adamw``) to the master copies with the bf16 gradients upcast,
  and rounds the masters into the bf16 weights after every update, the mixed-precision scheme of
  Micikevicius et al. 2018 (arXiv 1710.03740, §3.1). Parameters that are float32 already are
  updated in place as by ``AdamW``. The master copies are optimizer state, so checkpoints hold
  them and a resumed run continues exactly.
- ``bfloat16`` is the unset case for bf16 weights; with float32 weights it is refused (float32
  weights with bf16 moments is not offered).

torch's AdamW runs ``fused`` (one kernel over all parameters) when every parameter is a plain
tensor of a floating dtype on one device: torch's fastest form on CUDA, and on CPU it took the
quickstart policy's training step from 172 to 151 ms (``bench/train_step.py``, BENCHMARKS.md).
Its updates equal ``foreach``'s up to float rounding (1 ulp). Sharded parameters (DTensor) and
mixed devices take ``foreach``.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim.adamw import adamw

from ccrl.errors import RecipeError

_FLOAT32_STATE = ("master", "exp_avg", "exp_avg_sq")
"""per-parameter state that stays float32 whatever the parameter's dtype"""


def build_optimizer(groups: list[dict], params: list[torch.Tensor], stage) -> torch.optim.Optimizer:
    """AdamW over ``groups`` with the stage's lr, weight decay, betas and eps, its state in the
    precision ``stage.optimizer_state_dtype`` asks (see the module docstring)."""
    kw = dict(lr=stage.lr, weight_decay=stage.weight_decay, betas=tuple(getattr(stage, "adam_betas", (0.9, 0.95))),
              eps=getattr(stage, "adam_epsilon", 1e-8), foreach=True)
    want = getattr(stage, "optimizer_state_dtype", None)
    fused = fused_applies(params)
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    if want == "bfloat16" and len(low) < 1:
        raise RecipeError(f"stages.{stage.name}.optimizer_state_dtype: bfloat16 keeps AdamW's state in the weights' "
                          f"dtype and needs bf16 weights (model.dtype: bfloat16); these weights are float32, whose "
                          f"state is float32")
    if want == "float32" and low:
        return MasterWeightAdamW(groups, **kw)
    if fused:
        kw = {**kw, "foreach": None, "fused": True}
    return torch.optim.AdamW(groups, **kw)


def fused_applies(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain (not DTensor) tensors of a floating
    dtype it supports, all on one device of a type it has the kernel for."""
    from torch.distributed.tensor import DTensor

    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(not isinstance(p, DTensor) and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in params))


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose state is float32 for parameters of any dtype: a float32 master copy of every
    low-precision parameter (see the module docstring). For float32 parameters it computes exactly
    what ``torch.optim.AdamW`` computes (the same function does the arithmetic)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, masters, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float()
                    ref = state.get("master", p)
                    state["exp_avg"] = torch.zeros_like(ref, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(ref, memory_format=torch.preserve_format)
                params.append(p)
                masters.append(state.get("master", p))
                grads.append(p.grad if p.grad.dtype == torch.float32 else p.grad.float())
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamw(masters, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                                    amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            low = [(p, m) for p, m in zip(params, masters) if p is not m]
            if low:
                torch._foreach_copy_([p for p, _ in low], [m for _, m in low])   # round into the weights
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype, which
        would round the float32 masters and moments of a bf16 parameter to bf16: they are put back
        as saved (in float32, on the parameter's device) afterwards."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            for key in _FLOAT32_STATE:
                value = saved.get(pid, {}).get(key)
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
