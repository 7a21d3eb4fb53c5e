"""Linear weights cast to the autocast dtype once per rollout instead of once per decode step.

Under mixed precision (``mixed_precision: bf16``) a trainer's policy keeps float32 weights and
runs its forward under ``torch.autocast`` (accelerate wraps the prepared model's ``forward`` in
it). Autocast casts every ``nn.Linear`` weight to bf16 for its matmul on every call, and keeps
the cast only while the autocast context that made it is open: here, one forward. A rollout runs
one forward per decode step, so every step read each float32 weight and wrote its bf16 copy
before the matmuls read that (4 + 2 + 2 bytes a parameter where 2 would do); at 0.5B parameters
that is about 3.2 GB of memory traffic a step that the step's real work does not need, and in a
CUDA graph the casts are replayed with the rest.

:func:`cast_linear_weights_once` gives each plain ``nn.Linear`` of the policy, for the length of
the rollout, a forward pre-hook that, when the call runs under autocast on the weight's device,
points the layer at a copy of its float32 weight and bias in the autocast dtype, made on the
first such call and kept to the rollout's end; outside autocast it points the layer back at its
own parameters. The copy is what autocast would make (``Tensor.to``: the same rounding), and
autocast leaves a weight already in its dtype as it is, so the layer's output is the same bits.
The prefill is the first forward, so the copies are made before any CUDA graph capture. After
the rollout every layer has its own ``Parameter`` objects back (tied weights stay tied) and the
copies are freed. Layers that override ``forward`` (ternary layers, PEFT's LoRA wrapper: its
inner ``nn.Linear`` layers do get copies) are left alone.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts matmuls to on ``device``'s type when it is on there, else None."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):     # a device type autocast does not know
        pass
    return None


@contextlib.contextmanager
def cast_linear_weights_once(model: nn.Module):
    """Inside the context, ``model``'s float32 ``nn.Linear`` layers run under autocast on a copy of
    their weight and bias cast once to the autocast dtype (module docstring)."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    if not layers:
        yield
        return
    own = {id(m): (m.weight, m.bias) for m in layers}
    copies: dict[tuple[int, torch.dtype], tuple[nn.Parameter, nn.Parameter | None]] = {}

    def point(module: nn.Module, args) -> None:
        weight, bias = own[id(module)]
        dtype = autocast_dtype(weight.device)
        if dtype is None or dtype == weight.dtype:
            pair = (weight, bias)
        else:
            key = (id(module), dtype)
            pair = copies.get(key)
            if pair is None:
                with torch.no_grad():
                    pair = (nn.Parameter(weight.detach().to(dtype), requires_grad=False),
                            None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False))
                copies[key] = pair
        module._parameters["weight"], module._parameters["bias"] = pair

    handles = [m.register_forward_pre_hook(point) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in layers:
            m._parameters["weight"], m._parameters["bias"] = own[id(m)]
        copies.clear()
