"""Linear weights cast to the autocast dtype once per rollout instead of once per decode step.

Under mixed precision (``mixed_precision: bf16``) a trainer's policy keeps float32 weights and
runs its forward under ``torch.autocast`` (accelerate wraps the prepared model's ``forward`` in
it). Autocast casts every ``nn.Linear`` weight to bf16 for its matmul on every call, and keeps
the cast only while the autocast context that made it is open: here, one forward. A rollout runs
one forward per decode step, so every step read each float32 weight and wrote its bf16 copy
before the matmuls read that (4 + 2 + 2 bytes a parameter where 2 would do); at 0.5B parameters
that is about 3.2 GB of memory traffic a step that the step's real work does not need, and in a
CUDA graph the casts are replayed with the rest.

:func:`cast_linear_weights_once` decides at the rollout's first linear call (the prefill), with a
forward pre-hook on each plain ``nn.Linear`` of the policy that removes itself when it fires: if
that call runs under autocast, every float32 layer on that device type is pointed at a copy of its
weight and bias in the autocast dtype for the rest of the rollout; if not, nothing changes. No hook
runs after that first call, so a decode step (eager or a CUDA graph capture) pays nothing. The copy
is what autocast would make (``Tensor.to``: the same rounding), and autocast leaves a weight
already in its dtype as it is, so every layer's output is the same bits. This relies on every
forward of one rollout running under the same autocast state, as the engine's do (they call the
same policy the same way); a layer called outside autocast on a copy fails loudly (a dtype
mismatch), never silently. After the rollout every layer has its own ``Parameter`` objects back
(tied weights stay tied) and the copies are freed. Layers that override ``forward`` (ternary
layers, PEFT's LoRA wrapper: its inner ``nn.Linear`` layers do get copies) are left alone.
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
    """Inside the context, ``model``'s float32 ``nn.Linear`` layers run on copies of their weight and
    bias cast once to the autocast dtype, when the first linear call runs under autocast (module
    docstring)."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    own = [(m, m.weight, m.bias) for m in layers]
    handles: list = []

    def decide(module: nn.Module, args) -> None:
        for h in handles:
            h.remove()
        handles.clear()
        kind = module.weight.device.type
        dtype = autocast_dtype(module.weight.device)
        if dtype is None or dtype == torch.float32:
            return
        with torch.no_grad():
            for m, weight, bias in own:
                if weight.device.type == kind:
                    m._parameters["weight"] = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
                    if bias is not None:
                        m._parameters["bias"] = nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    handles += [m.register_forward_pre_hook(decide) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, weight, bias in own:
            m._parameters["weight"], m._parameters["bias"] = weight, bias
