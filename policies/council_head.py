"""The overseer and persona heads (the council mixture π_Ω), and ``CouncilHead`` for any HF causal LM.

DESIGN.md's formulas, on the final hidden state h of a token (s = the prefix so far):

    α(s)      = softmax(overseer(h) / T_o)                    over the P personas (dense)
    π_i(·|s)  = softmax(E (h + U_i V_i h) + b)                persona i: low-rank transform, shared unembedding E
    log π_Ω   = logsumexp_i (log α_i + log π_i)               a mixture of probabilities, not of logits
    H_Ω       = − Σ_i α_i log α_i                              on the dense α, so every overseer logit gets gradient

With ``overseer_top_k = k`` the sum runs over the k largest α_i with α renormalised over them
(log α̃ = log_softmax of the kept overseer logits); H_Ω stays on the dense α. The persona
transform is a LoRA-shaped update of h (Hu et al., arXiv 2106.09685); unlike LoRA neither factor
starts at zero, so the personas already differ at the first step and α gets a useful gradient.

Computation: E(h + U_i V_i h) = E h + (E U_i)(V_i h), so each persona costs a rank-r product
against the precomputed [P, V, r] tensor E U_i instead of a second unembedding. The persona
logits are materialised as a float32 [..., P, V] tensor and the mixture (``mixture_log_probs``,
a hand-written backward) keeps one more of that size for backward: with the small task
vocabularies of the presets (64-256) this is cheap; with a 32k vocabulary and long sequences
it dominates memory, so keep V small or the batch short.

``CouncilHead`` wraps any ``AutoModelForCausalLM``: it runs the wrapped model's decoder
(``base.base_model``) for the post-norm last hidden state and applies this head with the
wrapped model's output embedding (and its bias, if any). Model-specific logit post-processing
of the wrapped model (Gemma-2 soft-capping, Cohere's logit scale) is not reproduced. The cache
is the wrapped model's own (``generate`` creates a ``DynamicCache`` from its config).

Checkpoint layout of ``CouncilHead.save_pretrained(dir)``::

    dir/config.json               {"model_type": "ccrl_council_head", ...}: ``CouncilHeadConfig``
    dir/base/                     the wrapped model, its own save_pretrained (config + safetensors)
    dir/council_head.json         {"format": "ccrl.council_head", "version": 1, "num_personas", ...}
    dir/council_head.safetensors  the overseer and persona-head tensors (keys as in state_dict of .head)

``import policies`` registers ``CouncilHeadConfig`` with ``AutoConfig`` and ``CouncilHead`` with
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads such a folder as
it loads any other checkpoint. The top-level ``config.json`` only names the folder's kind: the
head's sizes are in ``council_head.json`` and the wrapped model's in ``base/config.json``. A folder
written before ``config.json`` was added loads with ``CouncilHead.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from policies.council_math import council_entropy, kept_log_alpha, mixture_logprobs
from policies.errors import PolicyCheckpointError, QuillanConfigError
from policies.hf_compat import cache_fields, cache_kwargs, keep_last_positions, output_cache, take_cache

HEAD_CONFIG = "council_head.json"
HEAD_WEIGHTS = "council_head.safetensors"


@dataclass
class CouncilMixture:
    """What the head computes for each kept position (leading dims ``...`` = [B, T] or [N])."""

    logits: torch.Tensor            # (..., V)  log π_Ω
    council_weights: torch.Tensor   # (..., P)  dense α
    council_entropy: torch.Tensor   # (...)     H_Ω
    overseer_logits: torch.Tensor   # (..., P)  overseer(h) / T_o
    overseer_indices: torch.Tensor | None  # (..., k) kept personas with overseer_top_k, else None
    persona_logits: torch.Tensor | None = None  # (..., P, V) every persona's logits (dense, before top-k)


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on CUDA and a CUDA graph is being captured on the current stream."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def mixture_log_probs_reference(persona_logits: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log Σ_i w_i softmax(persona_logits_i) (``council_math.mixture_logprobs`` of the persona log-softmax).

    [..., P, V], [..., P] → [..., V]; the eager twin of :func:`mixture_log_probs`."""
    return mixture_logprobs(log_w, persona_logits.log_softmax(-1))


class _MixtureLogProbs(torch.autograd.Function):
    """``mixture_log_probs`` with a hand-written backward: about half the passes over [N, P, V].

    Forward, with E_i = exp(X_i − max X_i), s_i = Σ_v E_i, c_i = w_i / s_i:
        π_Ω[v] = Σ_i c_i E_i[v]        (one batched mat-vec),  out = log π_Ω.
    Backward, with q = g / π_Ω and G_i = c_i Σ_v E_i[v] q[v] (= ∂L/∂log w_i):
        ∂L/∂X_i[u] = E_i[u] (c_i q[u] − G_i / s_i).
    Rows where some π_Ω[v] < 1e-30 (a log-probability below −69, where the product form would
    lose digits to float32 underflow) are computed with the logsumexp reference instead, exact
    at any depth; the other rows keep the fast path. Under CUDA graph capture (the rollout's
    decode step), which allows no data-dependent shapes, the reference runs on every row and is
    kept where a row is deep (the same values; no backward through such a forward).
    """

    TINY = 1e-30

    @staticmethod
    def forward(ctx, x, log_w):                      # x (N, P, V), log_w (N, P)
        e = (x - x.amax(-1, keepdim=True)).exp_()                                  # (N, P, V)
        s = e.sum(-1)                                                              # (N, P)
        c = log_w.exp() / s                                                        # (N, P)
        mix = torch.bmm(c.unsqueeze(1), e).squeeze(1)                              # (N, V)
        out = mix.log()                                                            # (N, V)
        if capturing(x):
            # a CUDA graph has no data-dependent shapes: every row's reference, kept where deep
            deep_rows = (mix < _MixtureLogProbs.TINY).any(-1, keepdim=True)        # (N, 1)
            out = torch.where(deep_rows, mixture_log_probs_reference(x, log_w), out)
            ctx.save_for_backward(e, s, c, mix, None, None, None)
            return out
        deep = (mix < _MixtureLogProbs.TINY).any(-1).nonzero().squeeze(-1)        # (n_deep)
        if deep.numel():
            out[deep] = mixture_log_probs_reference(x[deep], log_w[deep])
        ctx.save_for_backward(e, s, c, mix, deep, x[deep], log_w[deep])
        return out

    @staticmethod
    def backward(ctx, g):                            # g (N, V)
        e, s, c, mix, deep, x_deep, w_deep = ctx.saved_tensors
        if deep is None:
            raise RuntimeError("mixture_log_probs: no backward through a forward captured in a CUDA graph (decoding only)")
        q = g / mix                                                                # (N, V)
        big_g = c * torch.bmm(e, q.unsqueeze(-1)).squeeze(-1)                      # (N, P)
        dx = c.unsqueeze(-1) * q.unsqueeze(1)                                      # (N, P, V)
        dx.sub_((big_g / s).unsqueeze(-1)).mul_(e)
        if deep.numel():
            with torch.enable_grad():
                xl, wl = x_deep.detach().requires_grad_(), w_deep.detach().requires_grad_()
                gx, gw = torch.autograd.grad(mixture_log_probs_reference(xl, wl), (xl, wl), g[deep])
            dx[deep], big_g[deep] = gx, gw
        return dx, big_g


def mixture_log_probs(persona_logits: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log π_Ω = logsumexp_i (log w_i + log_softmax(persona_logits_i)); [..., P, V], [..., P] → [..., V]."""
    lead, (p, v) = persona_logits.shape[:-2], persona_logits.shape[-2:]
    x = persona_logits.reshape(-1, p, v).contiguous()
    out = _MixtureLogProbs.apply(x, log_w.reshape(-1, p).contiguous())
    return out.view(*lead, v)


class PersonaMixtureHead(nn.Module):
    """Overseer α(s) over P personas plus P low-rank persona heads sharing one unembedding.

    ``precision`` (``"fp"``, ``"ternary"``, ``"binary"``) applies to the persona factors V_i
    (``persona_down`` [P, r, d]) and U_i (``persona_up`` [P, d, r]), weights only, quantised
    with the straight-through estimator (``policies.ternary.fake_quantize_weight``) in groups of
    ``group_size`` along d: rows of V_i, and columns of U_i (U_iᵀ [P, r, d] is quantised, so each
    rank-one term u_j v_jᵀ has its scales along d on both sides). The overseer stays in full
    precision. ``pack_()`` stores quantised factors as 2-bit row codes (inference only).
    """

    FACTORS = ("persona_down", "persona_up")
    QUANTIZED_WEIGHTS = FACTORS    # what policies.ternary.quantized_parameters collects

    def __init__(
        self,
        hidden_size: int,
        num_personas: int = 32,
        persona_head_rank: int = 16,
        overseer_top_k: int | None = None,
        overseer_temperature: float = 1.0,
        *,
        precision: str = "fp",
        group_size: int | None = 128,
    ):
        super().__init__()
        from policies.ternary import check_precision

        if overseer_top_k is not None and not 1 <= overseer_top_k <= num_personas:
            raise QuillanConfigError(
                f"overseer_top_k: expected None or an int in [1, {num_personas}], got {overseer_top_k!r}"
            )
        self.num_personas = num_personas
        self.persona_head_rank = persona_head_rank
        self.overseer_top_k = overseer_top_k
        self.overseer_temperature = float(overseer_temperature)
        self.precision = check_precision(precision, "PersonaMixtureHead.precision")
        self.group_size = group_size
        self.factor_shape = (num_personas, persona_head_rank, hidden_size)           # (P, r, d) as quantised
        self.overseer = nn.Linear(hidden_size, num_personas, bias=False)
        self.persona_down = nn.Parameter(torch.empty(num_personas, persona_head_rank, hidden_size))  # V_i
        self.persona_up = nn.Parameter(torch.empty(num_personas, hidden_size, persona_head_rank))    # U_i
        self.is_packed = False
        self._dequantized: dict = {}                                                  # packed factors
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.overseer.weight, std=std)
        if not self.is_packed:
            nn.init.normal_(self.persona_down, std=self.persona_down.shape[-1] ** -0.5)
            nn.init.normal_(self.persona_up, std=std)

    def _rows(self, name: str) -> torch.Tensor:
        """Factor ``name`` as the [P, r, d] rows that are quantised (a view: U_i transposed)."""
        w = getattr(self, name)
        return w if name == "persona_down" else w.transpose(-1, -2)

    def persona_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [P, r, d], U [P, d, r]) with the precision applied: as they are for ``fp``, the
        quantised values (STE) for ternary/binary, or dequantised from their codes once packed."""
        if self.is_packed:
            from policies.packed import cached_stacked_rows

            dtype = self.overseer.weight.dtype
            v, ut = (cached_stacked_rows(self._dequantized, n, getattr(self, f"{n}_codes"), getattr(self, f"{n}_scale"),
                                         self.factor_shape, self.group_size, dtype) for n in self.FACTORS)
            return v, ut.transpose(-1, -2)
        if self.precision == "fp":
            return self.persona_down, self.persona_up
        from policies.ternary import fake_quantize_weight

        v, ut = (fake_quantize_weight(self._rows(n), self.precision, self.group_size) for n in self.FACTORS)
        return v, ut.transpose(-1, -2)

    @torch.no_grad()
    def pack_(self, structure_only: bool = False) -> None:
        """Replace ternary/binary factors by 2-bit row codes (``policies.packed.pack_stacked_rows``).

        Buffers ``persona_down_codes`` / ``persona_up_codes`` uint8 [P·r, ceil(d / 4)] (U_i as
        its transpose) and ``persona_down_scale`` / ``persona_up_scale`` float32 [P, r, G] (or
        [P, 1, 1] for ``group_size=None``). ``structure_only``: empty buffers of the right
        shapes, for ``load_state_dict`` of a packed checkpoint. A no-op for ``fp``.
        """
        if self.is_packed or self.precision == "fp":
            return
        from policies.packed import pack_stacked_param_

        for name in self.FACTORS:
            pack_stacked_param_(self, name, self._rows(name), self.factor_shape, self.precision, self.group_size,
                                structure_only)
        self.is_packed = True

    def _apply(self, fn, recurse=True):
        if not self.is_packed:
            return super()._apply(fn, recurse)
        from policies.packed import keep_float32_scales

        return keep_float32_scales(self, ("persona_down_scale", "persona_up_scale"), fn, recurse)

    def forward(
        self,
        hidden: torch.Tensor,
        unembed_weight: torch.Tensor,
        unembed_bias: torch.Tensor | None = None,
        overseer_indices: torch.Tensor | None = None,
    ) -> CouncilMixture:
        """``hidden`` [..., d]; ``unembed_weight`` [V, d]; ``overseer_indices`` [..., k] replays kept personas.

        The head runs in float32 whatever the model's dtype, and with autocast (mixed-precision
        training) switched off inside it (half-precision log-probabilities would not sum to one);
        the outputs are float32.
        """
        with autocast_off(hidden.device):
            return self._forward(hidden, unembed_weight, unembed_bias, overseer_indices)

    def _forward(self, hidden, unembed_weight, unembed_bias, overseer_indices) -> CouncilMixture:
        f32 = lambda t: t if t is None or t.dtype == torch.float32 else t.float()
        hidden, unembed_weight, unembed_bias = f32(hidden), f32(unembed_weight), f32(unembed_bias)
        o_logits = F.linear(hidden, f32(self.overseer.weight)) / self.overseer_temperature  # (..., P)
        log_alpha = o_logits.log_softmax(-1)                                          # (..., P)
        alpha = log_alpha.exp()                                                       # (..., P)
        entropy = council_entropy(alpha, log_alpha)                                   # (...) H_Ω
        base = F.linear(hidden, unembed_weight, unembed_bias)                         # (..., V)
        down, up = self.persona_factors()                                             # (P, r, d), (P, d, r)
        z = torch.einsum("...d,prd->...pr", hidden, f32(down))                       # (..., P, r)
        eu = torch.einsum("vd,pdr->pvr", unembed_weight, f32(up))                    # (P, V, r)
        persona = base.unsqueeze(-2) + torch.einsum("...pr,pvr->...pv", z, eu)       # (..., P, V)
        log_w = log_alpha
        dense_persona = persona
        if self.overseer_top_k is not None or overseer_indices is not None:
            if overseer_indices is None:
                overseer_indices = o_logits.topk(self.overseer_top_k, dim=-1).indices  # (..., k)
            log_w = kept_log_alpha(o_logits, overseer_indices)                        # (..., k) α renormalised
            idx = overseer_indices.unsqueeze(-1).expand(*overseer_indices.shape, persona.shape[-1])
            persona = persona.gather(-2, idx)                                         # (..., k, V)
        logits = mixture_log_probs(persona, log_w)                                    # (..., V) log π_Ω
        return CouncilMixture(logits, alpha, entropy, o_logits, overseer_indices, dense_persona)


def autocast_off(device: torch.device):
    """A context that disables autocast on ``device``'s type if it is on there (else does nothing)."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):                 # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labels != -100, HF's shift convention (logits at t predict labels at t+1)."""
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])                 # (B*(T-1), V)
    shift_labels = labels[..., 1:].reshape(-1).to(logits.device)                      # (B*(T-1))
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100)


@dataclass
class CouncilCausalLMOutput(ModelOutput):
    """Output of ``CouncilHead`` (the same council fields as ``QuillanCausalLMOutput``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None   # the KV cache, under both names: ``cache`` is what
    cache: object | None = None             # transformers >= 5.24 reads (``policies.hf_compat``)
    council_weights: torch.Tensor | None = None
    council_entropy: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple | None = None
    routing_indices: tuple | None = None
    router_stats: dict | None = None
    persona_logprobs: torch.Tensor | None = None


class CouncilHeadConfig(PretrainedConfig):
    """The top-level ``config.json`` of a :class:`CouncilHead` folder (model_type
    ``ccrl_council_head``), which lets ``AutoModelForCausalLM`` dispatch to
    :meth:`CouncilHead.from_pretrained`. ``base_model_type`` is the wrapped model's, for readers
    of the folder; nothing is loaded from it."""

    model_type = "ccrl_council_head"

    def __init__(self, base_model_type: str | None = None, **kwargs):
        self.base_model_type = base_model_type
        kwargs.setdefault("architectures", ["CouncilHead"])
        super().__init__(**kwargs)


def write_auto_config(folder) -> None:
    """Write a council-head folder's top-level ``config.json`` (:class:`CouncilHeadConfig`, naming
    the wrapped model's type from ``base/config.json``), by which ``AutoModelForCausalLM`` loads it."""
    folder = Path(folder)
    try:
        base_type = json.loads((folder / "base" / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        base_type = None
    CouncilHeadConfig(base_model_type=base_type).save_pretrained(folder)


class CouncilHead(PreTrainedModel, GenerationMixin):
    """Any HF causal LM + an overseer and persona heads: ``logits`` = log π_Ω of the council mixture.

    ``CouncilHead(base_model, num_personas=32, persona_head_rank=16, overseer_top_k=None)``.
    The wrapper shares the wrapped model's config (so ``generate`` builds the wrapped model's
    cache); its own fields live in ``council_head.json`` next to the wrapped checkpoint.
    Outputs as ``QuillanForCausalLM``'s, with no council layers: ``aux_loss`` is 0,
    ``router_logits`` is empty, and ``routing_indices`` is empty, or holds the overseer's kept
    personas [B, T, k] when ``overseer_top_k`` is set (replayable like Quillan's last entry).
    """

    config_class = CouncilHeadConfig      # what AutoModelForCausalLM dispatches on; an instance's
    base_model_prefix = "base"            # .config is the wrapped model's (generate builds its cache)
    _supports_sdpa = True
    _no_split_modules: list[str] = []

    def __init__(
        self,
        base_model: PreTrainedModel,
        num_personas: int = 32,
        persona_head_rank: int = 16,
        overseer_top_k: int | None = None,
        overseer_temperature: float = 1.0,
    ):
        super().__init__(base_model.config)
        self.base = base_model
        hidden = base_model.get_output_embeddings().weight.shape[1]
        self.head = PersonaMixtureHead(hidden, num_personas, persona_head_rank, overseer_top_k, overseer_temperature)
        self.head.to(device=base_model.device, dtype=base_model.get_output_embeddings().weight.dtype)
        self.generation_config = base_model.generation_config
        # post_init() would re-initialise the wrapped model; set the attributes it would have set.
        self.all_tied_weights_keys = {}
        self._keep_in_fp32_modules = set()
        self._keep_in_fp32_modules_strict = set()
        self._keys_to_ignore_on_save = set()

    def head_config(self) -> dict:
        h = self.head
        return {
            "format": "ccrl.council_head", "version": 1, "num_personas": h.num_personas,
            "persona_head_rank": h.persona_head_rank, "overseer_top_k": h.overseer_top_k,
            "overseer_temperature": h.overseer_temperature,
        }

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        routing_indices: tuple | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        output_persona_logprobs: bool = False,
        cache=None,
        **kwargs,
    ):
        """As ``QuillanForCausalLM.forward``; ``output_persona_logprobs`` adds every persona's
        next-token log-probs ``persona_logprobs`` [B, T', P, V] (the council-consensus reward reads them).
        The KV cache is taken as ``cache`` or ``past_key_values`` and handed to the wrapped model
        under the name its transformers release uses (``policies.hf_compat``)."""
        past_key_values = take_cache(past_key_values, cache, "CouncilHead.forward")
        decoder = self.base.base_model
        out = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **cache_kwargs(past_key_values), **kwargs,
        )
        hidden = keep_last_positions(out.last_hidden_state, logits_to_keep)          # (B, T', d)
        unembed = self.base.get_output_embeddings()
        replay = routing_indices[-1] if routing_indices else None
        mix = self.head(hidden, unembed.weight, getattr(unembed, "bias", None), replay)
        loss = next_token_loss(mix.logits, labels) if labels is not None else None
        output = CouncilCausalLMOutput(
            loss=loss,
            logits=mix.logits,
            **cache_fields(output_cache(out) if use_cache is not False else None),
            council_weights=mix.council_weights,
            council_entropy=mix.council_entropy,
            aux_loss=mix.logits.new_zeros(()),
            router_logits=(),
            routing_indices=() if mix.overseer_indices is None else (mix.overseer_indices,),
            router_stats={"overseer_load": mix.council_weights.detach().flatten(0, -2).mean(0)},
            persona_logprobs=mix.persona_logits.log_softmax(-1) if output_persona_logprobs else None,
        )
        return output if return_dict is not False else output.to_tuple()  # None (as PEFT passes) means a ModelOutput

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write ``base/`` (the wrapped model's checkpoint), ``council_head.json`` and ``council_head.safetensors``."""
        from safetensors.torch import save_file

        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.base.save_pretrained(root / "base", **kwargs)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(tensors, str(root / HEAD_WEIGHTS), metadata={"format": "pt"})
        (root / HEAD_CONFIG).write_text(json.dumps(self.head_config(), indent=2) + "\n")
        write_auto_config(root)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> CouncilHead:
        """Load a directory written by ``save_pretrained``; ``kwargs`` go to the wrapped model's loader
        (what ``AutoModelForCausalLM`` adds when it dispatches here is dropped: the folder's
        ``CouncilHeadConfig``, as the wrapped model's config is ``base/config.json``, except a ``dtype``
        given to the auto class, and its private ``_``-prefixed keys, which the wrapped model's
        ``AutoModelForCausalLM`` sets itself)."""
        from safetensors.torch import load_file

        folder_config = kwargs.pop("config") if isinstance(kwargs.get("config"), CouncilHeadConfig) else None
        if folder_config is not None and kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            if getattr(folder_config, "dtype", None) is not None:    # older transformers fold dtype= into the
                kwargs["dtype"] = folder_config.dtype                 # config the auto class read, not kwargs
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}

        root = Path(pretrained_model_name_or_path)
        for needed in ("base", HEAD_CONFIG, HEAD_WEIGHTS):
            if not (root / needed).exists():
                raise PolicyCheckpointError(f"CouncilHead.from_pretrained: {root} has no {needed!r} (expected base/, "
                                      f"{HEAD_CONFIG} and {HEAD_WEIGHTS})")
        meta = json.loads((root / HEAD_CONFIG).read_text())
        if meta.get("format") != "ccrl.council_head":
            raise PolicyCheckpointError(f"CouncilHead.from_pretrained: {root / HEAD_CONFIG} is not a council-head config")
        base = AutoModelForCausalLM.from_pretrained(root / "base", *model_args, **kwargs)
        model = cls(base, meta["num_personas"], meta["persona_head_rank"], meta["overseer_top_k"],
                    meta.get("overseer_temperature", 1.0))
        state = load_file(str(root / HEAD_WEIGHTS))
        missing, unexpected = model.head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PolicyCheckpointError(f"CouncilHead.from_pretrained: {root / HEAD_WEIGHTS} keys do not match "
                                  f"(missing {missing}, unexpected {unexpected})")
        model.head.to(device=base.device, dtype=base.get_output_embeddings().weight.dtype)
        return model
