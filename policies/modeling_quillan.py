"""The Quillan hierarchical council policy as a Hugging Face causal LM.

    tokens → embedding → N × [ RMSNorm → attention (GQA, RoPE, KV cache)
                               RMSNorm → council layer ]
           → RMSNorm → overseer α(s) over P personas → persona heads π_i
           → logits = log π_Ω = logsumexp_i (log α_i + log π_i)

What is in this file, and where each idea comes from:

- ``QuillanAttention``: grouped-query attention (arXiv 2305.13245) with rotary positions
  (RoPE, arXiv 2104.09864; the rotate-half layout of Llama), ``F.scaled_dot_product_attention``
  and a transformers ``Cache``. Left padding is handled by a boolean mask built from the 2-D
  ``attention_mask`` and by positions counted from it (as ``generate`` counts them); a prepared
  4-D boolean mask is used as is (transformers' models take one too). Given one, the forward
  reads nothing back to the host (persona counts by one-hot sums, not ``bincount``), so the
  rollout engine captures a decode step in a CUDA graph (``ccrl.rollout.engine``).
- ``PersonaRouter``: softmax router over P personas with temperature and top-k. Routing
  ``softmax_topk`` trains with the Switch load-balance loss (``load_balancing_loss``, arXiv
  2101.03961, as transformers' Mixtral); ``noaux_bias`` is DeepSeek-V3's aux-loss-free routing
  (arXiv 2412.19437): a per-persona bias is added to the scores for *selection* only, and
  ``update_bias`` moves it by ±γ against the observed load outside the gradient step.
  Deviation: DeepSeek-V3 scores with a sigmoid; here both modes score with the temperature
  softmax, and gate weights are the softmax of the selected logits (= the unbiased scores
  renormalised over the k selected personas).
- Routing replay (R3, arXiv 2510.11370): ``routing_indices`` given to ``forward`` replace the
  top-k selection exactly; gate weights still come from the current logits, so the router
  keeps its gradient. Replaying a forward's own indices reproduces its logits bit for bit
  (selection and gating share one code path).
- ``PersonaExperts``: P SwiGLU experts (arXiv 2002.05202) stored stacked. Dispatch sorts the
  (token, persona) assignments by persona (``argsort`` of the flattened top-k) and runs each
  projection as one grouped matmul over the contiguous persona segments (``torch._grouped_mm``,
  the kernel behind transformers' ``grouped_mm`` experts backend; a padded ``bmm`` where it
  does not apply; under autocast both operands are first cast to its dtype, as for a matmul). No capacity, no token dropping, no Python loop over tokens or personas.
  ``config.dispatch = "dense"`` switches to the eager reference beside it: every persona on
  every token, weighted by the dense gate matrix (zeros off the top-k). Tests compare the two.
- ``MicroSwarm``: PEER (arXiv 2407.04153) per persona: S rank-r micro-agents held in
  ``nn.Embedding`` tables, retrieved with product keys (arXiv 1907.05242): the query splits
  in two halves scored against n1 and n2 sub-keys (n1·n2 ≥ S, n2 = ceil(√S)), the top-m of the
  m × m candidate sums is exactly the top-m of the full grid, so routing costs O(√S) per head.
  Agent j computes silu(u_jᵀ x) v_j (r = 1; for r > 1, silu(U_j x) summed through V_j); the
  retrieved agents are mixed with the softmax of their scores (the up-projection is one
  ``embedding_bag`` with those weights, never materialising the gathered v_j). The fast path
  folds each persona's query net into its sub-keys (x · (K W_q)ᵀ), so one grouped matmul
  scores all n1 + n2 sub-keys; the dense reference computes the query first and scores the
  full grid exhaustively.
- Precision per component (the seeds' adaptive bit-width allocation): attention projections,
  persona and shared experts, micro-agents, the micro-agent query nets and the persona heads
  each ``ternary``/``binary``/``fp`` via ``policies.ternary`` (BitNet b1.58 QAT,
  straight-through estimator; the query nets and persona heads weights only); routers, norms,
  embeddings, sub-keys and the overseer stay in full precision.
- Inference packing: ``pack_ternary()`` turns the ternary/binary parts into 2-bit codes run by
  ``policies.packed`` (the C++ kernel or its reference); how each part is packed, and
  ``packed_state_dict``, live in ``policies.packed_quillan``. ``generate`` quantises each
  latent weight once per call (``frozen_quantization``).
- The overseer and persona heads (``policies.council_head.PersonaMixtureHead``) turn the
  final hidden state into log π_Ω; see that module for the formulas and the memory note:
  the persona log-probs are a [B, T, P, V] tensor, so the presets keep V small.

Shapes: B batch, T new tokens, S = past + T keys, d hidden, P personas, k persona_top_k,
N = B·T tokens, M = N·k (token, persona) assignments, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from policies import packed_quillan
from policies.configuration_quillan import QuillanConfig, count_parameters
from policies.council_head import PersonaMixtureHead, capturing, next_token_loss
from policies.errors import QuillanInputError
from policies.hf_compat import cache_fields, keep_last_positions, take_cache
from policies.ternary import BitLinear, fake_quantize_activation, fake_quantize_weight, frozen_quantization


# ----------------------------------------------------------------------------- small parts
class QuillanRMSNorm(nn.Module):
    """RMSNorm (arXiv 1910.07467), computed in float32 as Llama does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of RoPE for ``position_ids`` [B, T] → each [B, 1, T, head_dim] (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )                                                                             # (hd/2)
    freqs = position_ids[..., None].float() * inv_freq                            # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                       # (B, T, hd)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, hd] by the angles in cos/sin [B, 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def make_linear(config: QuillanConfig, in_features: int, out_features: int, precision: str) -> nn.Module:
    """``nn.Linear`` for ``fp``, else a ``BitLinear`` with the config's group and block sizes."""
    if precision == "fp":
        return nn.Linear(in_features, out_features, bias=False)
    return BitLinear(
        in_features, out_features, bias=False, precision=precision,
        group_size=config.weight_group_size, act_block_size=config.act_block_size,
    )


def positions_from_mask(attention_mask: torch.Tensor | None, past: int, q_len: int, device) -> torch.Tensor:
    """Position ids [B or 1, T]: counted over real tokens when a 2-D mask is given (as ``generate`` does)."""
    if attention_mask is None:
        return torch.arange(past, past + q_len, device=device).unsqueeze(0)      # (1, T)
    pos = attention_mask.long().cumsum(-1) - 1                                    # (B, S)
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[:, -q_len:]                                                        # (B, T)


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past: int, device) -> torch.Tensor | None:
    """Boolean SDPA mask [B or 1, 1, T, S] (True = attend), or None when plain causal attention applies.

    A padded query attends to itself as well, so no row is empty (SDPA would return NaN); its
    output is never read by a real token, which never attends to a padded key.
    """
    kv_len = past + q_len
    plain = attention_mask is None or bool(attention_mask.all())
    if plain and (q_len == 1 or past == 0):
        return None                                                               # is_causal (or all keys)
    keys = torch.arange(kv_len, device=device)                                    # (S)
    queries = torch.arange(past, kv_len, device=device)                           # (T)
    causal = keys[None, :] <= queries[:, None]                                    # (T, S)
    if plain:
        return causal[None, None]                                                 # (1, 1, T, S)
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()           # (B, 1, T, S)
    return mask | (keys[None, :] == queries[:, None])[None, None]


class QuillanAttention(nn.Module):
    """Grouped-query attention with RoPE and a KV cache."""

    def __init__(self, config: QuillanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd, prec = config.hidden_size, config.head_dim, config.attention_precision
        self.q_proj = make_linear(config, d, self.num_heads * hd, prec)
        self.k_proj = make_linear(config, d, self.num_kv_heads * hd, prec)
        self.v_proj = make_linear(config, d, self.num_kv_heads * hd, prec)
        self.o_proj = make_linear(config, self.num_heads * hd, d, prec)

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)                           # (B, Hkv, S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )                                                                                  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))                          # (B, T, d)


class SwiGLU(nn.Module):
    """The shared expert: down(silu(gate(x)) · up(x)) with the expert precision."""

    def __init__(self, config: QuillanConfig, intermediate: int):
        super().__init__()
        d, prec = config.hidden_size, config.expert_precision
        self.gate_proj = make_linear(config, d, intermediate, prec)
        self.up_proj = make_linear(config, d, intermediate, prec)
        self.down_proj = make_linear(config, intermediate, d, prec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- grouped matmul
class _GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with a backward that writes each gradient in its operand's layout (no transposed copies)."""

    @staticmethod
    def forward(ctx, x, weight, offs):                    # x (M, K), weight (P, N, K), offs (P,) int32
        ctx.save_for_backward(x, weight, offs)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)            # (M, N)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs = ctx.saved_tensors
        dy = _aligned(dy)                                                         # (M, N) contiguous, 16-byte aligned
        dx = torch._grouped_mm(dy, weight, offs=offs) if ctx.needs_input_grad[0] else None      # (M, K)
        dw = torch._grouped_mm(dy.t(), x, offs=offs) if ctx.needs_input_grad[1] else None       # (P, N, K)
        return dx, dw, None


def _grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``torch._grouped_mm`` takes operands of these shapes and dtypes (16-byte aligned strides).

    ``dtype``: ask for both operands cast to it (autocast) instead of their own dtypes.
    The choice depends on shapes and dtypes only, never on where a tensor happens to sit in
    memory (a checkpoint loaded by mmap can be misaligned; ``grouped_linear`` copies it), so a
    reloaded model takes the same kernel and gives bit-identical logits.
    """
    if dtype is None:
        if x.dtype != weight.dtype:
            return False
        dtype = x.dtype
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = dtype in (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda":
        ok_dtype = dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        return False
    n, k = weight.shape[1], weight.shape[2]
    size = dtype.itemsize
    return ok_dtype and (k * size) % 16 == 0 and (n * size) % 16 == 0


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``'s type while autocast is on there (mixed precision), else None."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):                 # a device type autocast does not know
        pass
    return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (a fresh copy only when it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] come in consecutive groups of ``counts`` [P] rows; group p uses ``weight[p]`` [N, K].

    Returns [M, N] with row m = weight[group(m)] @ x[m]. One grouped matmul; where
    ``torch._grouped_mm`` does not apply, the groups are padded to the largest and run as one bmm.
    """
    m, k = x.shape
    p, n, _ = weight.shape
    if m == 0:
        return x.new_zeros(0, n)
    low = _autocast_dtype(x.device)
    if low is not None and _grouped_mm_applies(x, weight, low):
        # autocast has no rule for torch._grouped_mm: cast both operands as it casts a matmul's, so
        # mixed-precision training takes the grouped kernel (bf16 on CUDA) instead of the padded bmm
        x, weight = x.to(low), weight.to(low)
    if _grouped_mm_applies(x, weight):
        x, weight = _aligned(x), _aligned(weight)
        offs = counts.cumsum(0).to(torch.int32)                                   # (P)
        return _GroupedMM.apply(x, weight, offs)                                  # (M, N)
    group = torch.repeat_interleave(torch.arange(p, device=x.device), counts, output_size=m)   # (M)
    pos = torch.arange(m, device=x.device) - (counts.cumsum(0) - counts)[group]   # (M) row within its group
    # the largest group, read back to the host; under CUDA graph capture, which forbids that, every row
    cap = m if capturing(x) else int(counts.max())
    buf = x.new_zeros(p, cap, k).index_put((group, pos), x)                       # (P, C, K)
    return torch.bmm(buf, weight.transpose(1, 2))[group, pos]                     # (M, N)


# ----------------------------------------------------------------------------- council layer
def persona_counts(indices: torch.Tensor, num_personas: int) -> torch.Tensor:
    """How many entries of ``indices`` (any shape) name each persona: [P] int64, the values of
    ``torch.bincount(indices.flatten(), minlength=P)`` without its host sync (on CUDA bincount reads
    the largest index back to size its output), so the decode step can be captured in a CUDA graph."""
    return F.one_hot(indices.reshape(-1), num_personas).sum(0)                   # (P)


def load_balancing_loss(
    router_logits: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balance loss (arXiv 2101.03961 eq. 4; Mixtral's top-k form in transformers).

    L = P · Σ_i f_i · p̄_i with f_i the fraction of the N·k assignments routed to persona i and
    p̄_i the mean router probability of i over the (unpadded) tokens. Balanced routing gives 1.
    ``router_logits`` [N, P], ``indices`` [N, k], ``token_mask`` [N] (True = real token).
    """
    p = router_logits.shape[-1]
    probs = (router_logits.float() / temperature).softmax(-1)                     # (N, P)
    assigned = F.one_hot(indices, p).sum(-2).float()                              # (N, P)
    if token_mask is not None:
        probs, assigned = probs[token_mask], assigned[token_mask]
    if probs.shape[0] == 0:
        return router_logits.new_zeros(())
    f = assigned.mean(0) / indices.shape[-1]                                      # (P) sums to 1
    return p * (f * probs.mean(0)).sum()


class PersonaRouter(nn.Module):
    """Top-k persona selection with temperature; softmax_topk or DeepSeek-V3 noaux_bias."""

    def __init__(self, config: QuillanConfig):
        super().__init__()
        self.top_k = config.persona_top_k
        self.num_personas = config.num_personas
        self.temperature = float(config.router_temperature)
        self.routing = config.routing
        self.proj = nn.Linear(config.hidden_size, config.num_personas, bias=False)
        self.register_buffer("score_bias", torch.zeros(config.num_personas))                  # selection bias
        self.register_buffer("load_counts", torch.zeros(config.num_personas), persistent=False)

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None):
        """``x`` [N, d] → (logits [N, P], indices [N, k], gates [N, k])."""
        logits = self.proj(x)                                                     # (N, P)
        scaled = logits / self.temperature                                        # (N, P)
        if replay is None:
            with torch.no_grad():
                score = scaled.softmax(-1)                                        # (N, P)
                if self.routing == "noaux_bias":
                    score = score + self.score_bias
                indices = score.topk(self.top_k, dim=-1).indices                  # (N, k)
        else:
            indices = replay
        gates = scaled.gather(-1, indices).softmax(-1)                            # (N, k) renormalised
        return logits, indices, gates

    @torch.no_grad()
    def record_load(self, indices: torch.Tensor) -> None:
        """Add the persona counts of ``indices`` [n, k] (real tokens only) to the load buffer."""
        self.load_counts += torch.bincount(indices.reshape(-1), minlength=self.num_personas).to(self.load_counts)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3: b_i ← b_i + γ · sign(mean load − load_i); then reset the counts."""
        if self.routing == "noaux_bias" and self.load_counts.sum() > 0:
            self.score_bias += rate * torch.sign(self.load_counts.mean() - self.load_counts)
        self.load_counts.zero_()


class PersonaExperts(nn.Module):
    """P SwiGLU persona experts, weights stacked: gate_up_proj [P, 2I, d], down_proj [P, d, I].

    ``pack_()`` switches a ternary/binary stack to 2-bit codes (``policies.packed``, buffers
    ``<name>_codes`` / ``<name>_scale``) for inference; the sorted path then runs the packed
    grouped kernel ``ternary_linear_grouped`` on the same persona segments.
    """

    WEIGHTS = ("gate_up_proj", "down_proj")
    QUANTIZED_WEIGHTS = WEIGHTS    # what policies.ternary.quantized_parameters collects

    def __init__(self, config: QuillanConfig):
        super().__init__()
        p, d, i = config.num_personas, config.hidden_size, config.expert_intermediate_size
        self.precision = config.expert_precision
        self.group_size = config.weight_group_size
        self.act_block_size = config.act_block_size
        self.gate_up_proj = nn.Parameter(torch.empty(p, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(p, d, i))
        self.shapes = {"gate_up_proj": (p, 2 * i, d), "down_proj": (p, d, i)}
        self.is_packed = False

    def _packed(self, name: str):
        return packed_quillan.persona_experts_packed(self, name)

    def _weights(self):
        if self.is_packed:                                                        # dequantised codes
            return packed_quillan.persona_experts_dequantized(self)
        fq = lambda w: fake_quantize_weight(w, self.precision, self.group_size)  # per persona, per row
        return fq(self.gate_up_proj), fq(self.down_proj)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.precision == "fp" else fake_quantize_activation(x, self.act_block_size)

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` [M, d] sorted by persona with ``counts`` [P] → [M, d]."""
        if self.is_packed:
            return packed_quillan.persona_experts_forward_sorted(self, x, counts)
        gate_up, down = self._weights()
        h = grouped_linear(self._act(x), gate_up, counts)                         # (M, 2I)
        g, u = h.chunk(2, dim=-1)
        return grouped_linear(self._act(F.silu(g) * u), down, counts)             # (M, d)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: every persona on every token, ``x`` [N, d] → [N, P, d]."""
        gate_up, down = self._weights()
        h = torch.einsum("nd,pod->npo", self._act(x), gate_up)                    # (N, P, 2I)
        g, u = h.chunk(2, dim=-1)
        return torch.einsum("npi,pdi->npd", self._act(F.silu(g) * u), down)       # (N, P, d)

    @torch.no_grad()
    def pack_(self, structure_only: bool = False) -> None:
        """Replace the latent weights by packed 2-bit codes and scales (inference only;
        ``policies.packed_quillan.pack_persona_experts_``)."""
        packed_quillan.pack_persona_experts_(self, structure_only)


GROUPED_TABLE_RATIO = 32
"""the micro-swarm trains through grouped matmuls over whole agent tables while a persona's table
holds at most this many times the agents one row retrieves (``MicroSwarm.mix``)"""


class MicroSwarm(nn.Module):
    """PEER micro-agents of every persona: product-key retrieval of the top-m rank-r agents.

    Precisions: the agent tables ``down``/``up`` take ``micro_precision`` (weights and the
    agents' inputs quantised), the query nets ``query`` take ``micro_query_precision`` (weights
    only); the sub-keys stay in full precision.
    """

    # what policies.ternary.quantized_parameters collects: weight -> attribute holding its precision
    QUANTIZED_WEIGHTS = {"down": "precision", "up": "precision", "query": "query_precision"}

    def __init__(self, config: QuillanConfig):
        super().__init__()
        p, d = config.num_personas, config.hidden_size
        self.num_personas, self.hidden = p, d
        self.n1, self.n2 = config.micro_grid
        self.agents = config.micro_agents_stored
        self.heads, self.key_dim = config.micro_query_heads, config.micro_key_dim
        self.rank, self.top_m = config.micro_rank, config.micro_top_m
        self.precision = config.micro_precision
        self.query_precision = config.micro_query_precision
        self.group_size = config.weight_group_size
        self.act_block_size = config.act_block_size
        half = self.key_dim // 2
        self.query_shape = (p, self.heads * self.key_dim, d)
        self.query = nn.Parameter(torch.empty(self.query_shape))                  # per-persona query nets
        self.sub_keys_1 = nn.Parameter(torch.empty(p, self.n1, half))
        self.sub_keys_2 = nn.Parameter(torch.empty(p, self.n2, half))
        self.down = nn.Embedding(p * self.agents, self.rank * d)                  # u_j (rank rows of d)
        self.up = nn.Embedding(p * self.agents, self.rank * d)                    # v_j
        self.is_packed = False                                                    # the agent tables
        self.query_packed = False
        self._dequantized: dict = {}                                              # packed query, dequantised

    def _query(self) -> torch.Tensor:
        """The query nets [P, h·dk, d] with their precision applied (STE), or dequantised from their codes once packed."""
        if self.query_packed:
            from policies.packed import cached_stacked_rows

            return cached_stacked_rows(self._dequantized, "query", self.query_codes, self.query_scale,
                                       self.query_shape, self.group_size, self.sub_keys_1.dtype)
        return fake_quantize_weight(self.query, self.query_precision, self.group_size)

    def _table(self, emb: nn.Embedding) -> torch.Tensor:
        """The agent table with its precision applied once per forward (rows of d, STE)."""
        w = emb.weight.view(-1, self.rank, self.hidden)                           # (P·S, r, d)
        return fake_quantize_weight(w, self.precision, self.group_size).view(emb.weight.shape)

    def _rows(self, name: str, sub: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``sub`` [M, L] (rows of d) of table ``name`` with its precision applied → [M, L, d].

        Packed: only the gathered rows' 2-bit codes and scales are read and dequantised (the
        values of the QAT table, bit for bit); latent: the fake-quantised table, gathered.
        """
        if self.is_packed:
            from policies.packed import dequantize_rows

            codes, scale = getattr(self, f"{name}_codes"), getattr(self, f"{name}_scale")
            return dequantize_rows(codes, scale, self.hidden, self.group_size, dtype, rows=sub)   # (M, L, d)
        return F.embedding(sub, self._table(getattr(self, name)).view(-1, self.hidden))           # (M, L, d)

    @torch.no_grad()
    def pack_(self, structure_only: bool = False) -> None:
        """Replace the quantised weights by 2-bit row codes and scales (inference only;
        ``policies.packed_quillan.pack_micro_swarm_``)."""
        packed_quillan.pack_micro_swarm_(self, structure_only)

    def _apply(self, fn, recurse=True):
        if not (self.is_packed or self.query_packed):
            return super()._apply(fn, recurse)
        from policies.packed import keep_float32_scales

        return keep_float32_scales(self, ("down_scale", "up_scale", "query_scale"), fn, recurse)

    def score_weight(self) -> torch.Tensor:
        """Sub-key scores as one linear map of x: row (head, key) of persona p is K[p, key] · W_q[p, head-half].

        s1 = (W_q1 x) · K1ᵀ = x · (K1 W_q1)ᵀ, so the fast path scores all n1 + n2 sub-keys of a
        head with one grouped matmul from x instead of a query projection plus two tiny ones.
        """
        p, h, half = self.num_personas, self.heads, self.key_dim // 2
        wq = self._query().view(p, h, 2, half, self.hidden)                        # (P, h, 2, dk/2, d)
        a1 = torch.einsum("pnc,phcd->phnd", self.sub_keys_1, wq[:, :, 0])          # (P, h, n1, d)
        a2 = torch.einsum("pnc,phcd->phnd", self.sub_keys_2, wq[:, :, 1])          # (P, h, n2, d)
        return torch.cat([a1, a2], dim=2).reshape(p, h * (self.n1 + self.n2), self.hidden)

    def forward_sorted(self, x: torch.Tensor, persona: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` [M, d] sorted by ``persona`` [M] with ``counts`` [P] → [M, d]."""
        s = grouped_linear(x, self.score_weight(), counts).view(x.shape[0], self.heads, -1)  # (M, h, n1+n2)
        s1, s2 = s.split([self.n1, self.n2], dim=-1)                              # (M, h, n1), (M, h, n2)
        return self.mix(x, persona, s1, s2, counts=counts)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: every persona's swarm on every token, exhaustive retrieval; [N, d] → [N, P, d]."""
        n, p, h, half = x.shape[0], self.num_personas, self.heads, self.key_dim // 2
        q = torch.einsum("nd,pqd->npq", x, self._query()).view(n, p, h, self.key_dim)  # (N, P, h, dk)
        q1, q2 = q.split(half, dim=-1)
        s1 = torch.einsum("nphc,pic->nphi", q1, self.sub_keys_1)                  # (N, P, h, n1)
        s2 = torch.einsum("nphc,pjc->nphj", q2, self.sub_keys_2)                  # (N, P, h, n2)
        persona = torch.arange(p, device=x.device).repeat(n)                      # (N·P)
        out = self.mix(x.repeat_interleave(p, 0), persona, s1.flatten(0, 1), s2.flatten(0, 1), exhaustive=True)
        return out.view(n, p, self.hidden)

    def mix(self, x, persona, s1, s2, exhaustive: bool = False, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Retrieve the top-m agents from sub-key scores s1 [M, h, n1], s2 [M, h, n2] and apply them.

        Two forms of the same function. Gathered (inference, packed tables, the dense reference):
        the chosen h·m·r rows of d are gathered per row, a = silu(U[rows] · x), y = Σ w · V[rows];
        a packed table dequantises only those rows, and the latent model computes the same
        arithmetic, so a packed checkpoint reproduces the QAT model's inference bit for bit.
        Grouped (training: gradients enabled, latent tables, rows sorted by persona with their
        ``counts`` [P]): every agent row of the row's persona is scored with one grouped matmul,
        a_all = x · U_pᵀ [M, S·r], the chosen columns are taken, and the output is one more grouped
        matmul y = w · V_p with the gated activations w scattered into [M, S·r]. That reads each
        table once instead of materialising h·m·r·d floats per row (6-16× the table at the
        presets' sizes) forward and backward. It multiplies S/(h·m) times more than it keeps, so
        it is taken while a persona's table has at most ``GROUPED_TABLE_RATIO`` = 32 times the
        agents a row retrieves (S ≤ 32·h·m; the presets have 8-16). The quickstart's training
        step (``bench/train_step.py``, 1 CPU thread, AdamW foreach) is 1.32× faster grouped at
        S/(h·m) = 8, as fast at 32, and 0.75× at 128 (BENCHMARKS.md). Its values are the gathered
        form's up to float rounding (about 1e-7 relative).
        """
        m_rows, h, top = x.shape[0], self.heads, self.top_m
        if exhaustive:
            grid = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)              # (M, h, n1·n2)
            score, agent = grid.topk(top, dim=-1)                                 # (M, h, m)
        else:
            v1, i1 = s1.topk(min(top, self.n1), dim=-1)                           # (M, h, m1)
            v2, i2 = s2.topk(min(top, self.n2), dim=-1)                           # (M, h, m2)
            cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)              # (M, h, m1·m2)
            cand_id = (i1.unsqueeze(-1) * self.n2 + i2.unsqueeze(-2)).flatten(-2)  # (M, h, m1·m2)
            score, j = cand.topk(top, dim=-1)                                     # (M, h, m)
            agent = cand_id.gather(-1, j)                                         # (M, h, m)
        gate = score.softmax(-1)                                                  # (M, h, m)
        r, d = self.rank, self.hidden
        if (counts is not None and not self.is_packed and torch.is_grad_enabled()
                and self.agents <= GROUPED_TABLE_RATIO * h * top):
            return self._mix_grouped(x, agent, gate, counts)
        rows = persona.view(-1, 1, 1) * self.agents + agent                       # (M, h, m)
        sub = (rows.unsqueeze(-1) * r + torch.arange(r, device=x.device)).view(m_rows, -1)   # (M, h·m·r) rows of d
        u = self._rows("down", sub, x.dtype)                                      # (M, h·m·r, d)
        xq = x if self.precision == "fp" else fake_quantize_activation(x, self.act_block_size)
        a = F.silu((u * xq.unsqueeze(1)).sum(-1))                                 # (M, h·m·r)
        w = (a.view(m_rows, h, top, r) * gate.unsqueeze(-1)).view(m_rows, -1)     # (M, h·m·r)
        if self.is_packed:                                # the same weighted sum over the gathered rows
            v = self._rows("up", sub, x.dtype).view(-1, d)                        # (M·h·m·r, d)
            local = torch.arange(v.shape[0], device=x.device).view(sub.shape)     # (M, h·m·r)
            return F.embedding_bag(local, v, per_sample_weights=w, mode="sum")    # (M, d)
        return F.embedding_bag(sub, self._table(self.up).view(-1, d), per_sample_weights=w, mode="sum")  # (M, d)

    def _mix_grouped(self, x, agent, gate, counts) -> torch.Tensor:
        """``mix`` on rows sorted by persona: the agents' rows as columns of two grouped matmuls."""
        m_rows, h, top = agent.shape
        p, s, r, d = self.num_personas, self.agents, self.rank, self.hidden
        local = (agent.unsqueeze(-1) * r + torch.arange(r, device=x.device)).view(m_rows, -1)  # (M, h·m·r) in S·r
        xq = x if self.precision == "fp" else fake_quantize_activation(x, self.act_block_size)
        a_all = grouped_linear(xq, self._table(self.down).view(p, s * r, d), counts)  # (M, S·r)
        a = F.silu(a_all.gather(1, local))                                        # (M, h·m·r)
        w = (a.view(m_rows, h, top, r) * gate.unsqueeze(-1)).view(m_rows, -1)     # (M, h·m·r)
        dense = w.new_zeros(m_rows, s * r).scatter_add(1, local, w)               # (M, S·r) repeats summed
        return grouped_linear(dense, self._table(self.up).view(p, s * r, d).transpose(1, 2), counts)  # (M, d)


class CouncilLayer(nn.Module):
    """Router → top-k personas (SwiGLU expert + micro-swarm each) → gated sum, plus a shared expert."""

    def __init__(self, config: QuillanConfig):
        super().__init__()
        self.config = config
        self.router = PersonaRouter(config)
        self.experts = PersonaExperts(config)
        self.micro = MicroSwarm(config) if config.micro_agents else None
        self.shared = SwiGLU(config, config.shared_expert_intermediate_size) if config.shared_expert else None

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None):
        """``x`` [B, T, d] → (y [B, T, d], router logits [N, P], indices [B, T, k])."""
        b, t, d = x.shape
        k = self.router.top_k
        flat = x.reshape(-1, d)                                                   # (N, d)
        logits, idx, gates = self.router(flat, None if replay is None else replay.reshape(-1, k))
        if self.config.dispatch == "dense":
            y = self._dense(flat, idx, gates)
        else:
            y = self._sorted(flat, idx, gates)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(b, t, d), logits, idx.view(b, t, k)

    def _sorted(self, x, idx, gates) -> torch.Tensor:
        """Fast path: assignments sorted by persona, grouped matmuls over persona segments."""
        n, k = idx.shape
        flat_idx = idx.reshape(-1)                                                # (M)
        order = flat_idx.argsort(stable=True)                                     # (M)
        persona = flat_idx[order]                                                 # (M) sorted
        counts = persona_counts(flat_idx, self.router.num_personas)              # (P)
        xs = x[order // k]                                                        # (M, d)
        ys = self.experts.forward_sorted(xs, counts)                              # (M, d)
        if self.micro is not None:
            ys = ys + self.micro.forward_sorted(xs, persona, counts)
        ys = ys * gates.reshape(-1)[order].unsqueeze(-1)                          # (M, d)
        out = torch.empty_like(ys).index_copy(0, order, ys)                       # (M, d) back in (n, k) order
        return out.view(n, k, -1).sum(1)                                          # (N, d)

    def _dense(self, x, idx, gates) -> torch.Tensor:
        """Eager reference: every persona on every token, masked by the dense gate matrix."""
        dense_gates = torch.zeros(x.shape[0], self.router.num_personas, dtype=gates.dtype, device=x.device)
        dense_gates = dense_gates.scatter(1, idx, gates)                          # (N, P)
        out = self.experts.forward_dense(x)                                       # (N, P, d)
        if self.micro is not None:
            out = out + self.micro.forward_dense(x)
        return torch.einsum("np,npd->nd", dense_gates, out)                       # (N, d)


class QuillanBlock(GradientCheckpointingLayer):
    """x + attention(norm(x)), then + council(norm(x))."""

    def __init__(self, config: QuillanConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = QuillanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = QuillanAttention(config, layer_idx)
        self.council_norm = QuillanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.council = CouncilLayer(config)

    def forward(self, hidden, cos, sin, mask, past_key_values=None, replay=None):
        hidden = hidden + self.attn(self.attn_norm(hidden), cos, sin, mask, past_key_values)
        y, logits, idx = self.council(self.council_norm(hidden), replay)
        return hidden + y, logits, idx


# ----------------------------------------------------------------------------- HF models
@dataclass
class QuillanModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None    # the KV cache, under both names: ``cache`` is what
    cache: Cache | None = None              # transformers >= 5.24 reads (``policies.hf_compat``)
    hidden_states: tuple | None = None
    router_logits: tuple | None = None      # one (N, P) per council layer
    routing_indices: tuple | None = None    # one (B, T, k) per council layer
    token_mask: torch.Tensor | None = None  # (B, T) real tokens, or None when there is no padding


@dataclass
class QuillanCausalLMOutput(ModelOutput):
    """Output of ``QuillanForCausalLM``; ``logits`` are log π_Ω (normalised log-probabilities)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None               # (B, T, V)  log π_Ω
    past_key_values: Cache | None = None             # the KV cache, under both names: ``cache`` is
    cache: Cache | None = None                       # what transformers >= 5.24 reads (``policies.hf_compat``)
    hidden_states: tuple | None = None
    council_weights: torch.Tensor | None = None      # (B, T, P)  dense α
    council_entropy: torch.Tensor | None = None      # (B, T)     H_Ω
    aux_loss: torch.Tensor | None = None             # ()         mean load-balance loss of the council layers
    router_logits: tuple | None = None               # L × (B·T, P)
    routing_indices: tuple | None = None             # L × (B, T, k) [+ (B, T, k_o) of the overseer]
    router_stats: dict | None = None                 # detached diagnostics, see ``router_statistics``
    persona_logprobs: torch.Tensor | None = None     # (B, T, P, V) log π_i, when asked for


class QuillanPreTrainedModel(PreTrainedModel):
    config_class = QuillanConfig
    config: QuillanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QuillanBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)                     # Linear (BitLinear too), Embedding, RMSNorm
        std = self.config.initializer_range
        if isinstance(module, PersonaExperts) and not module.is_packed:
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MicroSwarm):
            if not module.query_packed:
                init.normal_(module.query, mean=0.0, std=std)
            init.normal_(module.sub_keys_1, mean=0.0, std=1.0)
            init.normal_(module.sub_keys_2, mean=0.0, std=1.0)
            if not module.is_packed:
                init.normal_(module.down.weight, mean=0.0, std=module.hidden ** -0.5)
                init.normal_(module.up.weight, mean=0.0, std=std)
        elif isinstance(module, PersonaRouter):
            init.zeros_(module.score_bias)
            init.zeros_(module.load_counts)
        elif isinstance(module, PersonaMixtureHead) and not module.is_packed:
            init.normal_(module.persona_down, mean=0.0, std=module.persona_down.shape[-1] ** -0.5)
            init.normal_(module.persona_up, mean=0.0, std=std)


class QuillanModel(QuillanPreTrainedModel):
    """Embedding, the blocks, and the final RMSNorm; returns the normed hidden state and the routes."""

    def __init__(self, config: QuillanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([QuillanBlock(config, i) for i in range(config.num_layers)])
        self.norm = QuillanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        routing_indices: tuple | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> QuillanModelOutput:
        past_key_values = take_cache(past_key_values, cache, "QuillanModel.forward")
        if (input_ids is None) == (inputs_embeds is None):
            raise QuillanInputError("QuillanModel.forward: pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds     # (B, T, d)
        b, t = hidden.shape[:2]
        if use_cache is None:                             # no cache by default in training (memory)
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        prepared = attention_mask is not None and attention_mask.dim() == 4
        if prepared:    # a prepared boolean mask [B|1, 1, T, S], used as is (transformers' models take one too)
            if attention_mask.dtype != torch.bool or attention_mask.shape[0] not in (1, b) or attention_mask.shape[2] != t:
                raise QuillanInputError(
                    f"QuillanModel.forward: a 4-D attention_mask must be boolean [batch or 1, 1, {t}, keys], got "
                    f"{attention_mask.dtype} {list(attention_mask.shape)}"
                )
        elif attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (b, past + t):
                raise QuillanInputError(
                    f"QuillanModel.forward: attention_mask must be 2-D [batch, past + new tokens] = "
                    f"[{b}, {past + t}], got {list(attention_mask.shape)}"
                )
        if position_ids is None:
            position_ids = positions_from_mask(None if prepared else attention_mask, past, t, hidden.device)  # (B|1, T)
        mask = attention_mask if prepared else build_attention_mask(attention_mask, t, past, hidden.device)  # (B|1, 1, T, S)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        replay = self._check_replay(routing_indices, b, t)
        all_hidden, router_logits, indices = [], [], []
        for i, layer in enumerate(self.layers):                                             # loop over layers
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden, logits, idx = layer(hidden, cos, sin, mask, past_key_values=past_key_values, replay=replay[i])
            router_logits.append(logits)
            indices.append(idx)
        hidden = self.norm(hidden)
        token_mask = None
        if attention_mask is not None and not prepared and not bool(attention_mask.all()):
            token_mask = attention_mask[:, -t:].bool()                                      # (B, T)
        return QuillanModelOutput(
            last_hidden_state=hidden,
            **cache_fields(past_key_values if use_cache else None),
            hidden_states=tuple(all_hidden) + (hidden,) if output_hidden_states else None,
            router_logits=tuple(router_logits),
            routing_indices=tuple(indices),
            token_mask=token_mask,
        )

    def _check_replay(self, routing_indices, b: int, t: int) -> list:
        """Validate replayed routes: one LongTensor [B, T, k] per council layer (an extra overseer entry is ignored here)."""
        n_layers, k, p = self.config.num_layers, self.config.persona_top_k, self.config.num_personas
        if routing_indices is None or len(routing_indices) == 0:
            return [None] * n_layers
        if len(routing_indices) < n_layers:
            raise QuillanInputError(
                f"routing_indices: expected one tensor per council layer ({n_layers}), got {len(routing_indices)}"
            )
        out = []
        for i, idx in enumerate(routing_indices[:n_layers]):
            if not isinstance(idx, torch.Tensor) or idx.shape != (b, t, k) or idx.dtype != torch.long:
                got = list(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
                raise QuillanInputError(f"routing_indices[{i}]: expected a LongTensor [{b}, {t}, {k}], got {got}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p):
                raise QuillanInputError(f"routing_indices[{i}]: persona ids must lie in [0, {p})")
            out.append(idx)
        return out


def router_statistics(indices: tuple, num_personas: int, token_mask: torch.Tensor | None, alpha: torch.Tensor) -> dict:
    """Detached diagnostics: persona load per council layer, its max share and entropy, overseer load.

    ``persona_load`` [L, P]: fraction of the (real) token→persona assignments per persona;
    ``max_share`` [L]; ``load_entropy`` [L] (nats, log P when balanced); ``overseer_load`` [P]:
    mean α over real tokens; ``overseer_max_share`` (): its largest entry.
    """
    with torch.no_grad():
        loads = []
        for idx in indices:                                                       # loop over layers
            kept = idx[token_mask] if token_mask is not None else idx.reshape(-1, idx.shape[-1])
            counts = persona_counts(kept, num_personas).float()                  # (P)
            loads.append(counts / counts.sum().clamp_min(1.0))
        load = torch.stack(loads) if loads else alpha.new_zeros(0, num_personas)  # (L, P)
        entropy = -(load * load.clamp_min(1e-30).log()).sum(-1)                   # (L)
        a = alpha.detach().float()
        a = a[token_mask] if token_mask is not None and a.shape[:2] == token_mask.shape else a.reshape(-1, a.shape[-1])
        overseer = a.mean(0) if a.shape[0] else a.new_zeros(num_personas)         # (P)
        return {
            "persona_load": load,
            "max_share": load.max(-1).values if loads else load.new_zeros(0),
            "load_entropy": entropy,
            "overseer_load": overseer,
            "overseer_max_share": overseer.max(),
        }


class QuillanForCausalLM(QuillanPreTrainedModel, GenerationMixin):
    """The Quillan council policy; ``logits`` = log π_Ω, so HF sampling samples the council mixture."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuillanConfig):
        super().__init__(config)
        self.model = QuillanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.council_head = PersonaMixtureHead(
            config.hidden_size, config.num_personas, config.persona_head_rank,
            config.overseer_top_k, config.overseer_temperature,
            precision=config.persona_head_precision, group_size=config.weight_group_size,
        )
        self.post_init()
        if config.ternary_packed:
            self.pack_ternary()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        routing_indices: tuple | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_persona_logprobs: bool = False,
        cache: Cache | None = None,
        **kwargs,
    ):
        """``output_persona_logprobs`` adds ``persona_logprobs`` [B, T', P, V]: each persona's
        next-token log-probs log π_i (dense over all personas), read by the council-consensus reward.
        The KV cache is taken as ``cache`` or ``past_key_values`` (``policies.hf_compat``)."""
        past_key_values = take_cache(past_key_values, cache, "QuillanForCausalLM.forward")
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            routing_indices=routing_indices, output_hidden_states=output_hidden_states,
        )
        n_layers = self.config.num_layers
        overseer_replay = None
        if routing_indices is not None and len(routing_indices) > n_layers:
            overseer_replay = routing_indices[n_layers]
        hidden = keep_last_positions(out.last_hidden_state, logits_to_keep)      # (B, T', d)
        mix = self.council_head(hidden, self.lm_head.weight, None, overseer_replay)
        flat_mask = out.token_mask.reshape(-1) if out.token_mask is not None else None
        aux_terms = [
            load_balancing_loss(lg, idx.reshape(-1, idx.shape[-1]), self.config.router_temperature, flat_mask)
            for lg, idx in zip(out.router_logits, out.routing_indices)
        ]                                                                          # loop over layers
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else mix.logits.new_zeros(())
        loss = None
        if labels is not None:
            loss = next_token_loss(mix.logits, labels) + self.config.router_aux_loss_coef * aux_loss
        if self.training and self.config.routing == "noaux_bias":
            for layer, idx in zip(self.model.layers, out.routing_indices):       # loop over layers
                layer.council.router.record_load(idx[out.token_mask] if out.token_mask is not None else idx)
        indices = out.routing_indices
        if mix.overseer_indices is not None:
            indices = indices + (mix.overseer_indices,)
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        output = QuillanCausalLMOutput(
            loss=loss,
            logits=mix.logits,
            **cache_fields(out.past_key_values),
            hidden_states=out.hidden_states,
            council_weights=mix.council_weights,
            council_entropy=mix.council_entropy,
            aux_loss=aux_loss,
            router_logits=out.router_logits if want_logits else None,
            routing_indices=indices,
            router_stats=router_statistics(
                out.routing_indices, self.config.num_personas, out.token_mask, mix.council_weights
            ),
            persona_logprobs=mix.persona_logits.log_softmax(-1) if output_persona_logprobs else None,
        )
        return output if return_dict is not False else output.to_tuple()  # None (as PEFT passes) means a ModelOutput

    # ------------------------------------------------------------------ trainer hooks
    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Apply DeepSeek-V3's bias update to every council router (noaux_bias; a no-op otherwise). Call after optimizer.step()."""
        for layer in self.model.layers:                                           # loop over layers
            layer.council.router.update_bias(self.config.router_bias_update_rate)

    def active_parameters_per_token(self) -> int:
        """Parameters one token touches (``count_parameters(config)["active"]``), for the ICE cost."""
        return count_parameters(self.config)["active"]

    def pack_ternary(self):
        """Switch to packed 2-bit weights for inference (``policies.packed_quillan.pack_quillan_``); returns self.

        The model must be in eval mode. A config with ``ternary_packed=True`` builds the packed
        structure directly, so ``from_pretrained`` loads packed checkpoints.
        """
        return packed_quillan.pack_quillan_(self)

    def packed_state_dict(self, fp_dtype: torch.dtype | None = None) -> dict:
        """The state dict of a packed checkpoint, with the full-precision tensors in ``fp_dtype``
        (``None``: as they are); see ``policies.packed_quillan.packed_state_dict``."""
        return packed_quillan.packed_state_dict(self, fp_dtype)

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate`` with each quantised weight computed once for the whole call."""
        with frozen_quantization():
            return super().generate(*args, **kwargs)
