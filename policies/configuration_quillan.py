"""Configuration of the Quillan council policy, its presets, and its parameter count.

``QuillanConfig`` is a ``transformers.PreTrainedConfig`` (model_type ``"quillan"``): every size
of the model is a field here, and presets only fill them in. ``count_parameters(config)``
computes the total and the per-token active parameter count from the config alone; the tests
check it against ``sum(p.numel())`` of a built model.

Where the ideas come from:

- GQA attention with RoPE: Ainslie et al., arXiv 2305.13245; Su et al., arXiv 2104.09864.
- Council layer = a mixture of 32 persona experts, top-k routed: Switch Transformer load
  balance (arXiv 2101.03961) or DeepSeek-V3's aux-loss-free bias routing (arXiv 2412.19437).
- Micro-swarm = PEER, parameter-efficient expert retrieval with product keys (arXiv
  2407.04153; product keys from Lample et al., arXiv 1907.05242).
- Ternary / binary layers: BitNet b1.58 (arXiv 2402.17764) and BitNet (arXiv 2310.11453).

Product-key grid. The S micro-agents of a persona sit on an n1 × n2 grid of sub-key pairs with
n2 = ceil(√S) and n1 = ceil(S / n2); a persona stores n1·n2 ≥ S agents (S rounded up to fill the
grid: 7,000 → 84 × 84 = 7,056, 6 → 2 × 3 = 6). Routing scores n1 + n2 sub-keys per head, i.e.
O(√S), and retrieval is exact (the top-m of the full grid, as PEER proves for a full grid).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from transformers import PreTrainedConfig

from policies.errors import QuillanConfigError

ROUTINGS = ("softmax_topk", "noaux_bias")
PRECISIONS = ("ternary", "binary", "fp")
DISPATCHES = ("sorted", "dense")


class QuillanConfig(PreTrainedConfig):
    """Every size of the Quillan council policy.

    Defaults are the ``small`` preset's sizes. Its precisions and quantisation sizes are the
    preset's own (``PRESETS``: ternary throughout, one weight scale per matrix, activation
    blocks of 32, so that its packed checkpoint is at most 1/7 of its bf16 one); the defaults
    of those fields are what ``toy`` and ``base`` use (full-precision attention, query nets and
    persona heads; weight groups of 128, activation blocks of 64), and ``"fp"`` for
    ``micro_query_precision`` / ``persona_head_precision`` is also what a checkpoint saved
    before those two fields existed means.
    """

    model_type = "quillan"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Standard names that transformers, PEFT and TRL look for.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_experts": "num_personas",
        "num_local_experts": "num_personas",
        "num_experts_per_tok": "persona_top_k",
    }

    vocab_size: int = 128
    """tokens in the vocabulary (the task vocabularies are ~40-100 characters; see the memory note in modeling)"""
    hidden_size: int = 256
    """width d of the residual stream"""
    num_layers: int = 4
    """number of blocks (attention + council layer)"""
    num_attention_heads: int = 8
    """query heads"""
    num_key_value_heads: int = 4
    """key/value heads (GQA); must divide num_attention_heads"""
    head_dim: int | None = None
    """per-head width; None = hidden_size // num_attention_heads"""
    max_position_embeddings: int = 512
    """longest sequence the model is meant for (RoPE itself has no hard limit)"""
    rope_theta: float = 10000.0
    """RoPE base"""
    rms_norm_eps: float = 1e-6
    """epsilon of every RMSNorm"""
    initializer_range: float = 0.02
    """std of the normal initialisation of linear layers and embeddings"""

    num_personas: int = 32
    """P, personas of every council layer and of the overseer"""
    persona_top_k: int = 2
    """personas each token is routed to in a council layer"""
    router_temperature: float = 1.0
    """softmax temperature of the council-layer routers"""
    routing: str = "softmax_topk"
    """'softmax_topk' (Switch load-balance aux loss) or 'noaux_bias' (DeepSeek-V3 bias update)"""
    router_aux_loss_coef: float = 0.01
    """weight of aux_loss in the training loss (Switch uses 1e-2); set 0 for pure noaux_bias"""
    router_bias_update_rate: float = 1e-3
    """γ of the noaux_bias sign update (Megatron's moe_router_bias_update_rate)"""
    output_router_logits: bool = True
    """return the council routers' logits in the output"""
    shared_expert: bool = True
    """add an always-on SwiGLU expert to every council layer (DeepSeekMoE)"""
    shared_expert_intermediate_size: int | None = 384
    """hidden width of the shared expert; None = expert_intermediate_size"""
    expert_intermediate_size: int = 96
    """hidden width of each persona's SwiGLU expert"""

    micro_agents: int = 64
    """S, micro-agents per persona (0 disables the micro-swarm); rounded up to the n1 x n2 grid"""
    micro_rank: int = 1
    """r, rank of each micro-agent (PEER uses r = 1: one down and one up vector)"""
    micro_top_m: int = 4
    """m, micro-agents retrieved per token, per head"""
    micro_query_heads: int = 1
    """h, PEER retrieval heads (each with its own query, sharing the keys and agents)"""
    micro_key_dim: int = 32
    """query width per head; each sub-key has micro_key_dim // 2 dims"""

    overseer_top_k: int | None = None
    """personas kept in the final mixture π_Ω (None = all, the dense mixture)"""
    overseer_temperature: float = 1.0
    """softmax temperature of the overseer α(s)"""
    persona_head_rank: int = 16
    """rank of each persona head's low-rank transform h + U_i V_i h"""
    persona_head_precision: str = "fp"
    """'ternary' | 'binary' | 'fp' for the persona heads' factors V_i [P, r, d] and U_i [P, d, r]:
    weights only, one absmean scale per weight group along d (for U_i, along each of its r
    columns). The overseer and the shared unembedding stay in full precision. 'fp' (the
    default) is what checkpoints saved before this field existed hold"""

    attention_precision: str = "fp"
    """'ternary' | 'binary' | 'fp' for q/k/v/o projections"""
    expert_precision: str = "ternary"
    """precision of the persona SwiGLU experts and the shared expert"""
    micro_precision: str = "ternary"
    """precision of the micro-agents' down/up vectors"""
    micro_query_precision: str = "fp"
    """'ternary' | 'binary' | 'fp' for the micro-swarms' per-persona query nets [P, h·dk, d]:
    their weights only, one absmean scale per weight group along d (the query is folded into the
    sub-keys for retrieval, not run by the ternary kernel, so its inputs are not quantised);
    the sub-keys stay in full precision. 'fp' (the default) is what checkpoints saved before
    this field existed hold"""
    weight_group_size: int | None = 128
    """inputs per weight scale (absmean); None = one scale per tensor (BitNet b1.58): per
    projection, per persona expert matrix, per micro-agent, per persona's query net and head
    factor. A packed checkpoint stores each scale as a float32 (with 128: 1/32 byte per weight
    beside the 1/4 byte of its 2-bit code)"""
    act_block_size: int | None = 64
    """inputs per activation scale (absmax int8); None = one scale per token. The packed kernel
    pads every in-dimension to a multiple of the smaller of this and weight_group_size (when
    that is smaller than the in-dimension), with zero codes that the packed checkpoint stores:
    64 pads the persona experts' 96-wide down projections of 'small' to 128"""
    ternary_packed: bool = False
    """build BitLinear layers already packed (policies.packed) for inference checkpoints"""
    dispatch: str = "sorted"
    """'sorted' (tokens sorted by persona, grouped matmuls) or 'dense' (the eager reference)"""

    use_cache: bool = True
    """return a KV cache from forward"""
    tie_word_embeddings: bool = True
    """the output embedding (and every persona head) shares the input embedding"""
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            if self.num_attention_heads > 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.expert_intermediate_size
        super().__post_init__(**kwargs)
        self.validate_fields()

    # ------------------------------------------------------------------ validation
    def validate_fields(self) -> None:
        """Raise ``QuillanConfigError`` naming the first invalid field."""
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "num_personas", "persona_top_k",
            "expert_intermediate_size", "shared_expert_intermediate_size", "micro_rank",
            "micro_top_m", "micro_query_heads", "micro_key_dim", "persona_head_rank",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise QuillanConfigError(f"QuillanConfig.{name}: expected a positive int, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "router_temperature", "overseer_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise QuillanConfigError(f"QuillanConfig.{name}: expected a positive number, got {value!r}")
        if not isinstance(self.micro_agents, int) or self.micro_agents < 0:
            raise QuillanConfigError(f"QuillanConfig.micro_agents: expected an int >= 0, got {self.micro_agents!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise QuillanConfigError(
                f"QuillanConfig.num_key_value_heads: {self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise QuillanConfigError(f"QuillanConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.persona_top_k > self.num_personas:
            raise QuillanConfigError(
                f"QuillanConfig.persona_top_k: {self.persona_top_k} exceeds num_personas={self.num_personas}"
            )
        if self.overseer_top_k is not None and not (
            isinstance(self.overseer_top_k, int) and 1 <= self.overseer_top_k <= self.num_personas
        ):
            raise QuillanConfigError(
                f"QuillanConfig.overseer_top_k: expected None or an int in [1, {self.num_personas}], "
                f"got {self.overseer_top_k!r}"
            )
        if self.micro_key_dim % 2:
            raise QuillanConfigError(
                f"QuillanConfig.micro_key_dim: product keys split the query in two halves; got odd {self.micro_key_dim}"
            )
        if self.micro_agents and self.micro_top_m > self.micro_agents_stored:
            raise QuillanConfigError(
                f"QuillanConfig.micro_top_m: {self.micro_top_m} exceeds the {self.micro_agents_stored} micro-agents per persona"
            )
        choices = {"routing": ROUTINGS, "dispatch": DISPATCHES, "attention_precision": PRECISIONS,
                   "expert_precision": PRECISIONS, "micro_precision": PRECISIONS,
                   "micro_query_precision": PRECISIONS, "persona_head_precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise QuillanConfigError(f"QuillanConfig.{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("weight_group_size", "act_block_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise QuillanConfigError(f"QuillanConfig.{name}: expected a positive int or None, got {value!r}")
        for name in ("router_aux_loss_coef", "router_bias_update_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise QuillanConfigError(f"QuillanConfig.{name}: expected a number >= 0, got {value!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def micro_grid(self) -> tuple[int, int]:
        """(n1, n2): sub-keys on each side of the product-key grid; n2 = ceil(√S), n1 = ceil(S / n2)."""
        if not self.micro_agents:
            return (0, 0)
        n2 = math.isqrt(self.micro_agents - 1) + 1                              # ceil(sqrt(S))
        return (-(-self.micro_agents // n2), n2)

    @property
    def micro_agents_stored(self) -> int:
        """Micro-agents a persona actually stores: n1 · n2 ≥ micro_agents."""
        n1, n2 = self.micro_grid
        return n1 * n2

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuillanConfig:
        """A named preset ("toy", "small", "base") with any field overridden by keyword."""
        if name not in PRESETS:
            hint = difflib.get_close_matches(str(name), PRESETS, n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise QuillanConfigError(f"QuillanConfig.preset: unknown preset {name!r}; known: {sorted(PRESETS)}{more}")
        known = set(cls.__dataclass_fields__) | set(cls.attribute_map)
        for key in overrides:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else ""
                raise QuillanConfigError(f"QuillanConfig.preset({name!r}): unknown field {key!r}{more}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: < 1M parameters, runs in milliseconds.
    "toy": dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, num_personas=32, persona_top_k=2, expert_intermediate_size=32,
        shared_expert_intermediate_size=32, micro_agents=16, micro_rank=2, micro_top_m=4,
        micro_query_heads=2, micro_key_dim=8, persona_head_rank=4,
    ),
    # CPU recipes: ~10-30M parameters in all, a few M active per token. Ternary throughout
    # (attention, experts, micro-agents, their query nets, persona heads), one weight scale per
    # matrix and activation blocks of 32 (which divide the experts' 96 inputs: no padded codes),
    # so that a packed checkpoint is at most 1/7 of the bf16 one (bench/packed_size.py).
    "small": dict(
        vocab_size=128, hidden_size=256, num_layers=4, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512, num_personas=32, persona_top_k=2, expert_intermediate_size=96,
        shared_expert_intermediate_size=384, micro_agents=64, micro_rank=1, micro_top_m=4,
        micro_query_heads=1, micro_key_dim=32, persona_head_rank=16,
        attention_precision="ternary", micro_query_precision="ternary", persona_head_precision="ternary",
        weight_group_size=None, act_block_size=32,
    ),
    # GPU: ~100-300M parameters.
    "base": dict(
        vocab_size=256, hidden_size=768, num_layers=8, num_attention_heads=12, num_key_value_heads=4,
        max_position_embeddings=2048, num_personas=32, persona_top_k=2, expert_intermediate_size=128,
        shared_expert_intermediate_size=2048, micro_agents=256, micro_rank=1, micro_top_m=8,
        micro_query_heads=2, micro_key_dim=64, persona_head_rank=32,
    ),
}


def count_parameters(config: QuillanConfig) -> dict[str, int]:
    """Total and per-token active parameter counts of ``QuillanForCausalLM(config)``, from the config alone.

    total: every trainable tensor (the tied output embedding counted once).
    active: what one token touches: embeddings, attention, norms, every router and the
    overseer, the shared expert, the ``persona_top_k`` routed persona experts, for each of them
    its micro-swarm's query projection and all its sub-keys (scored for retrieval) plus the
    ``micro_top_m × micro_query_heads`` retrieved micro-agents, and the persona heads that enter
    the mixture (``overseer_top_k`` of them, or all).
    """
    c = config
    d, p, k = c.hidden_size, c.num_personas, c.persona_top_k
    embed = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    attn = d * c.num_attention_heads * c.head_dim * 2 + d * c.num_key_value_heads * c.head_dim * 2
    norms = 2 * d
    router = d * p
    expert = 3 * d * c.expert_intermediate_size
    shared = 3 * d * c.shared_expert_intermediate_size if c.shared_expert else 0
    if c.micro_agents:
        n1, n2 = c.micro_grid
        query = d * c.micro_query_heads * c.micro_key_dim
        keys = (n1 + n2) * (c.micro_key_dim // 2)
        agent = 2 * c.micro_rank * d
        micro_total = query + keys + c.micro_agents_stored * agent
        micro_active = query + keys + c.micro_query_heads * c.micro_top_m * agent
    else:
        micro_total = micro_active = 0
    layer_total = attn + norms + router + shared + p * (expert + micro_total)
    layer_active = attn + norms + router + shared + k * (expert + micro_active)
    head = 2 * c.persona_head_rank * d
    heads_used = c.overseer_top_k or p
    top = d + d * p                                                          # final norm + overseer
    total = embed + c.num_layers * layer_total + top + p * head
    active = embed + c.num_layers * layer_active + top + heads_used * head
    return {"total": int(total), "active": int(active)}
