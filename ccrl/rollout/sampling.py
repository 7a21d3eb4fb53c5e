"""How a completion token is drawn: the sampling settings and the draw itself.

:class:`SamplingConfig` holds the settings (temperature, top-k, top-p, greedy, stop sequences and
the decoder choice). The draw follows TRL's GRPO sampling: the logits are divided by the
temperature, top-k / top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751) only restrict which
tokens can be drawn, and the recorded log-probability is that of the tempered distribution.

On the CPU a token is drawn with ``torch.multinomial``; elsewhere with the exponential race that
multinomial runs for one sample, argmax(p / E) with E ~ Exp(1) (:func:`draw`): the same draws and
the same tokens, without multinomial's check of the probabilities, which some torch versions read
back to the host (a sync per token, and no CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """How completions are drawn."""

    max_new_tokens: int = 16
    """length limit of a completion"""
    temperature: float = 1.0
    """softmax temperature (ignored when greedy)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1: off)"""
    top_k: int = 0
    """keep only the k most likely tokens (0: off)"""
    greedy: bool = False
    """argmax decoding (evaluation)"""
    stop_sequences: list[list[int]] = field(default_factory=list)
    """token-id sequences that end a completion (besides EOS); the stop tokens are kept"""
    compact_fraction: float = 0.25
    """compact the batch when at least this fraction of live rows has finished (eager decoding)"""
    cuda_graph: bool | str = "auto"
    """decode on a static KV cache with one CUDA graph of the decode step, replayed per token:
    ``"auto"``: on CUDA when the step can be captured (else the eager loop); ``True``: on CUDA, an
    error where it cannot be captured; ``False``: the eager loop; ``"static"``: the graph path's
    decoding without the capture, on any device (its eager twin, which the tests compare)"""
    check_every: int = 8
    """off the CPU, count the finished rows (a host sync) only every this many decode steps; on the
    CPU every step"""
    attend_window: int = 128
    """static decoding (``cuda_graph`` auto / True / ``"static"``): attend over the prompt and the
    completion columns written so far rounded up to a multiple of this many, not over the whole
    preallocated cache; one CUDA graph is captured per window (``ccrl.rollout.decode_graph``).
    0: the whole cache from the first column, one graph"""
    decode_kernel: str = "auto"
    """attention of an HF policy's one-token decode step: ``"auto"``: on CUDA in bf16 / fp16 the
    Triton split-K kernel (``ccrl.rollout.decode_kernel``) where Triton is installed, else SDPA;
    ``"sdpa"``: always torch's ``scaled_dot_product_attention``"""

    def __post_init__(self):
        if self.cuda_graph not in (True, False, "auto", "static"):
            raise ValueError(f"SamplingConfig.cuda_graph: expected true, false, 'auto' or 'static', got {self.cuda_graph!r}")
        if self.check_every < 1:
            raise ValueError(f"SamplingConfig.check_every: expected an integer >= 1, got {self.check_every!r}")
        if self.decode_kernel not in ("auto", "sdpa"):
            raise ValueError(f"SamplingConfig.decode_kernel: expected 'auto' or 'sdpa', got {self.decode_kernel!r}")
        if isinstance(self.attend_window, bool) or not isinstance(self.attend_window, int) or self.attend_window < 0:
            raise ValueError(f"SamplingConfig.attend_window: expected an integer >= 0, got {self.attend_window!r}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus (top-p) set with -inf. logits: (N, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                          # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)              # (N, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p                           # keep the token crossing p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_rows(probs: torch.Tensor, live: torch.Tensor, n_rows: int, generator) -> torch.Tensor:
    """One token per live row from ``probs`` (n_live, V), drawn as if every row of the batch were
    still in it: ``torch.multinomial`` draws one exponential per (row, token) of its input, so the
    rows dropped by compaction get a placeholder distribution and the random stream, hence every
    live row's sample, is the same with compaction on or off. A generator on another device than
    ``probs`` (trainers seed CPU generators per step) draws on its own device, so runs stay
    reproducible from the same seed on CPU and GPU alike."""
    if generator is not None and not same_device(generator.device, probs.device):
        return sample_rows(probs.to(generator.device), live.to(generator.device), n_rows, generator).to(probs.device)
    if live.numel() == n_rows:
        return draw(probs, generator)
    full = probs.new_ones((n_rows, probs.shape[-1]))                            # (N, V)
    full[live] = probs
    return draw(full, generator)[live]


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of ``probs`` (n, V): ``torch.multinomial(probs, 1)`` on the CPU; elsewhere the
    exponential race that multinomial runs for one sample, argmax(p / E) with E ~ Exp(1) drawn by
    ``exponential_`` (the same draws, the same tokens), without its check of the probabilities,
    which some torch versions read back to the host: a sync per token, and no CUDA graph."""
    if probs.device.type == "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)         # (n, V)
    return (probs / race).argmax(-1)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one ("cuda" without an index is the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index or a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
