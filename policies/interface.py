"""What a trainer may ask of a policy, without knowing its class: the policy interface.

Answered for ``QuillanForCausalLM``, ``CouncilHead`` and any plain Hugging Face causal LM,
each possibly wrapped in PEFT adapters (``get_base_model``):

- ``has_council(model)``: its forward returns the overseer's dense α (``council_weights``)
  and H_Ω (``council_entropy``), so the CCRL objective and the council rewards apply.
- ``accepts_routes(model)``: its forward takes ``routing_indices`` (routing replay, R3):
  the routes a rollout recorded can be given back so that training sees the same experts.
- ``overseer_route_index(model)``: where the overseer's entries start in its
  ``routing_indices`` (after the council layers' own routes), or None when it has none /
  the layout is unknown.
- ``router_load_buffers(model)``: the routers' token-count buffers that the aux-loss-free
  bias update reads (DeepSeek-V3, arXiv 2412.19437); ``router_bias_update(model)`` is that
  update, or None for a model without one.
- ``output_head(model)``: the plain linear output head whose outputs are the policy's logits (a
  plain causal LM), or None; ``head_inputs(head)`` catches that head's input during a forward and
  skips its matmul, so that a trainer can apply the head itself, chunk by chunk over the tokens
  (``ccrl.objectives.chunked_token_logprobs``), instead of holding (B, T, V) logits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "accepts_routes",
    "base_model",
    "has_council",
    "head_inputs",
    "output_head",
    "overseer_route_index",
    "router_bias_update",
    "router_load_buffers",
    ]


def base_model(model: nn.Module) -> nn.Module:
    """The model under PEFT adapters (``get_base_model()``), else ``model`` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def has_council(model: nn.Module) -> bool:
    """Whether the policy (under any adapters) is a council: an overseer over personas whose
    forward returns ``council_weights``. A model of another class counts if it has an ``overseer``."""
    from policies.council_head import CouncilHead
    from policies.modeling_quillan import QuillanForCausalLM

    base = base_model(model)
    return isinstance(base, (QuillanForCausalLM, CouncilHead)) or hasattr(base, "overseer")


def accepts_routes(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``routing_indices`` (recorded routes can be replayed).

    Asked of the object that will be called: PEFT's wrapper forwards keyword arguments it does
    not name, so it answers False and routes are not replayed through it."""
    try:
        return "routing_indices" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def overseer_route_index(model: nn.Module) -> int | None:
    """Index of the first overseer entry in the policy's ``routing_indices`` (the entries that
    follow the output head's positions), or None when the policy's layout is unknown.

    ``CouncilHead``: 0 (its only routes are the overseer's); Quillan: after its
    ``num_layers`` council layers."""
    from policies.council_head import CouncilHead
    from policies.modeling_quillan import QuillanForCausalLM

    base = base_model(model)
    if isinstance(base, CouncilHead):
        return 0
    if isinstance(base, QuillanForCausalLM):
        return int(base.config.num_layers)
    return None


def router_load_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The council routers' ``load_counts`` buffers (tokens routed to each persona since the last
    bias update), in module order; empty for a model without such routers."""
    from policies.modeling_quillan import PersonaRouter

    return [m.load_counts for m in model.modules() if isinstance(m, PersonaRouter)]


def router_bias_update(model: nn.Module) -> Callable[[], None] | None:
    """The routers' aux-loss-free bias update, to call after ``optimizer.step()`` (having summed
    :func:`router_load_buffers` over the processes), or None when the policy has none."""
    update = getattr(model, "update_router_bias", None)
    return update if callable(update) else None


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")
"""config fields with which a transformers model changes its head's outputs before returning them as
logits (Gemma 2's soft-capping, Cohere's and Granite's scales, ...): such a model's logits are not
``head(h)``, so :func:`output_head` answers None for it"""


def output_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a plain causal LM, whose forward returns ``head(h)`` as its logits for the
    kept positions of the final hidden states h; None for a council policy (its logits are the persona
    mixture), a head that is not a plain ``nn.Linear`` (wrapped by adapters, quantised) and a model
    whose config transforms the head's outputs (:data:`LOGIT_TRANSFORMS`)."""
    if has_council(model):
        return None
    base = base_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return None
    cfg = getattr(base, "config", None)
    text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    if any(getattr(text, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS):
        return None
    return head


@contextlib.contextmanager
def head_inputs(head: nn.Module) -> Iterator[dict]:
    """Inside the block, every call of ``head`` stores its input under ``"hidden"`` of the yielded dict
    and runs on zero positions instead (``(..., 0, V)`` logits: none are computed). The caller applies
    the head's weight itself; autograd reaches the model through the stored input. ``"autocast"``
    holds the autocast dtype the head would have run under (the model's forward may be wrapped in
    autocast, e.g. by accelerate's mixed precision, while the caller is not), or None.

    The zero positions run with autocast off: under autocast ``nn.Linear`` would cast the whole
    (V, H) weight to the autocast dtype even for no positions, and keep that copy alive in the graph
    of the returned logits as long as the caller holds the model's output (0.3 GB for a 151,936 ×
    1,024 head in bf16). The weight itself stays in that graph, so DDP's search for unused
    parameters (``find_unused_parameters``) still counts the head as used by the forward."""
    box: dict = {}

    def take(hidden, *args, **kwargs):
        box["hidden"] = hidden
        dev = hidden.device.type
        box["autocast"] = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        none = hidden.narrow(-2, 0, 0)                                   # (..., 0, H)
        with torch.autocast(dev, enabled=False):
            return nn.functional.linear(none.to(head.weight.dtype), head.weight, head.bias)

    own = head.__dict__.get("forward")          # an instance-level forward (a hook library's), kept
    head.forward = take
    try:
        yield box
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward
