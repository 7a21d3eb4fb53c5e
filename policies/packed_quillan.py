"""Packed inference of the Quillan policy: its quantised parts switched to 2-bit codes.

``QuillanForCausalLM.pack_ternary()`` (:func:`pack_quillan_`) turns, in place and for inference
only, every ternary/binary part of the QAT model (``policies.modeling_quillan``) into codes
that reproduce its forward bit for bit:

- ``BitLinear`` layers → ``PackedBitLinear`` (the I2-tile kernel, ``policies.packed_modules``);
- persona expert stacks → stacked I2-tile codes run by ``ternary_linear_grouped`` on the
  same persona segments as the QAT grouped matmul (:func:`pack_persona_experts_`);
- micro-agent tables → row-wise 2-bit codes of which only the retrieved rows are dequantised,
  and micro-agent query nets → row codes dequantised once (:func:`pack_micro_swarm_`);
- persona heads → row codes (``PersonaMixtureHead.pack_``).

The buffers keep the names the modules always had (``<weight>_codes`` / ``<weight>_scale``),
so packed checkpoints load with ``from_pretrained`` (a config with ``ternary_packed=True``
builds the packed structure first). :func:`packed_state_dict` can store the full-precision
rest in another dtype. The modules call these functions; they import nothing of this file's
callers, and the C++ extension loads only when a packed path first runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from policies.packed_codec import PackedTernary, geometry, pack_quantized, unpack_ternary
from policies.packed_rows import pack_rows
from policies.quantization import expand_scale, quantize_stacked


def packed_modules():
    """``policies.packed_modules`` (imported on first use: it loads the C++ extension)."""
    from policies import packed_modules as mods

    return mods


def pack_quillan_(model):
    """Switch ``model`` (a ``QuillanForCausalLM``) to packed 2-bit weights for inference, in place; returns it.

    Every ternary/binary ``BitLinear`` (``pack_model_``), every ternary/binary stack of
    persona experts (``PersonaExperts.pack_``), every ternary/binary pair of micro-agent
    tables (``MicroSwarm.pack_``: row-wise 2-bit codes, only the retrieved rows dequantised
    per token) and ternary/binary micro-agent query nets and persona heads (row codes,
    dequantised once and kept until the buffers change) is packed; the model must be in
    eval mode. A config with ``ternary_packed=True`` builds the packed structure directly,
    so ``from_pretrained`` loads packed checkpoints.
    """
    structure_only = bool(model.config.ternary_packed)
    packed_modules().pack_model_(model, structure_only=structure_only)            # checks eval mode
    for layer in model.model.layers:                                              # loop over layers
        layer.council.experts.pack_(structure_only=structure_only)
        if layer.council.micro is not None:
            layer.council.micro.pack_(structure_only=structure_only)
    model.council_head.pack_(structure_only=structure_only)
    return model


def persona_experts_packed(experts, name: str) -> PackedTernary:
    """The ``PackedTernary`` view of the packed stack ``name`` of ``PersonaExperts`` ``experts``."""
    _, n, k = experts.shapes[name]
    return PackedTernary(getattr(experts, f"{name}_codes"), getattr(experts, f"{name}_scale"), k, n,
                         experts.group_size, experts.act_block_size)


def persona_experts_dequantized(experts) -> tuple[torch.Tensor, ...]:
    """The packed expert stacks dequantised (q · scale, float32): (gate_up [P, 2I, d], down [P, d, I])."""
    out = []
    for name in experts.WEIGHTS:                                                  # two tensors, not personas
        q, scale = unpack_ternary(persona_experts_packed(experts, name))
        out.append(q.float() * expand_scale(scale, q.shape[-1], experts.group_size))
    return tuple(out)


def persona_experts_forward_sorted(experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The packed twin of ``PersonaExperts.forward_sorted``: ``x`` [M, d] sorted by persona with
    ``counts`` [P] → [M, d], each projection one ``ternary_linear_grouped`` call."""
    from policies.packed_op import ternary_linear_grouped

    offs = counts.cumsum(0)                                                       # (P)
    g, u = ternary_linear_grouped(x, persona_experts_packed(experts, "gate_up_proj"), offs).chunk(2, dim=-1)
    return ternary_linear_grouped((F.silu(g) * u).contiguous(), persona_experts_packed(experts, "down_proj"), offs)


@torch.no_grad()
def pack_persona_experts_(experts, structure_only: bool = False) -> None:
    """Replace the latent weights of ``PersonaExperts`` ``experts`` by packed 2-bit codes and scales (inference only).

    ``structure_only``: empty buffers of the right shapes, for ``load_state_dict`` of a
    packed checkpoint.
    """
    if experts.is_packed or experts.precision == "fp":
        return
    for name in experts.WEIGHTS:
        w = getattr(experts, name)
        p, n, k = w.shape
        if structure_only:
            geo = geometry(k, experts.group_size, experts.act_block_size)
            codes = torch.full((p, n, geo["k_pad"] // 4), 0x55, dtype=torch.uint8, device=w.device)
            per_matrix = experts.group_size is None
            scale = torch.zeros((p, 1, 1) if per_matrix else (p, n, geo["G"]), device=w.device)
        else:
            q, scale = quantize_stacked(w, experts.precision, experts.group_size)
            packed = pack_quantized(q, scale, experts.group_size, experts.act_block_size)
            codes, scale = packed.codes, packed.scale
        delattr(experts, name)
        experts.register_buffer(f"{name}_codes", codes)
        experts.register_buffer(f"{name}_scale", scale)
    experts.is_packed = True


@torch.no_grad()
def pack_micro_swarm_(micro, structure_only: bool = False) -> None:
    """Replace the quantised weights of ``MicroSwarm`` ``micro`` by 2-bit row codes and scales (inference only).

    Agent tables (``micro_precision`` ternary/binary; ``policies.packed_rows.pack_rows``): buffers
    ``<table>_codes`` uint8 [P·S·r, ceil(d / 4)] and ``<table>_scale`` float32 [P·S·r, G]
    (G = ceil(d / group), 1 when a group spans the row; ``group_size=None`` repeats each
    agent's one scale over its r rows). Query nets (``micro_query_precision`` ternary/binary;
    ``policies.packed_rows.pack_stacked_rows``): ``query_codes`` uint8 [P·h·dk, ceil(d / 4)] and
    ``query_scale`` float32 [P, h·dk, G] (or [P, 1, 1]). ``structure_only``: empty buffers
    of the right shapes, for ``load_state_dict`` of a packed checkpoint.
    """
    if micro.query_precision != "fp" and not micro.query_packed:
        packed_modules().pack_stacked_param_(micro, "query", micro.query, micro.query_shape,
                                             micro.query_precision, micro.group_size, structure_only)
        micro.query_packed = True
    if micro.is_packed or micro.precision == "fp":
        return
    d, r, gs = micro.hidden, micro.rank, micro.group_size
    groups = 1 if gs is None or gs <= 0 or gs >= d else -(-d // gs)
    for name in ("down", "up"):
        weight = getattr(micro, name).weight                                      # (P·S, r·d)
        rows = weight.shape[0] * r
        if structure_only:
            codes = torch.full((rows, -(-d // 4)), 0x55, dtype=torch.uint8, device=weight.device)
            scale = torch.zeros(rows, groups, dtype=torch.float32, device=weight.device)
        else:
            q, scale = quantize_stacked(weight.view(-1, r, d), micro.precision, gs)   # (P·S, r, d), (P·S, r|1, G)
            codes = pack_rows(q.reshape(rows, d))
            scale = scale.expand(-1, r, -1).reshape(rows, groups).contiguous()
        delattr(micro, name)
        micro.register_buffer(f"{name}_codes", codes)
        micro.register_buffer(f"{name}_scale", scale)
    micro.is_packed = True


def packed_state_dict(model, fp_dtype: torch.dtype | None = None) -> dict:
    """The state dict of a packed checkpoint of ``model``, with the full-precision tensors in ``fp_dtype``.

    2-bit codes and their float32 scales stay as they are; every other floating tensor
    (embeddings, norms, routers, the overseer, persona heads, full-precision projections,
    micro-agent queries and sub-keys) is cast to ``fp_dtype`` (``None``: kept as it is).
    ``from_pretrained`` casts them back to the model's dtype. The router selection biases
    (``score_bias``, a few numbers per layer) are never cast.

    ``torch.bfloat16`` roughly halves what those tensors take, but it rounds them: the
    loaded model is no longer the QAT model, and its greedy tokens may depart from the QAT
    model's (docs/policies-notes.md). The exact export keeps them as they are.
    """
    state = model.state_dict()
    if fp_dtype is None:
        return state
    keep = ("_scale", "score_bias")                   # exact scales of the codes; selection biases
    cast: dict = {}                                   # one copy per storage: tied weights stay tied
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and not name.endswith(keep):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key not in cast:
                cast[key] = t.to(fp_dtype)
            t = cast[key]
        out[name] = t
    return out
