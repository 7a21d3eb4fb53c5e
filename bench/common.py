"""Shared pieces of the benchmarks against peers: the Llama sizes, the tokenizers, the environment
header, medians.

The scripts put the repository root first on ``sys.path`` before importing this module (run as
``python bench/x.py``, ``sys.path[0]`` is ``bench/``, where ``bench/kernels.py`` would shadow the
Hugging Face ``kernels`` package that transformers probes for).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 688,
    "max_position_embeddings": 512,
}
"""the tiny Llama both sides of a benchmark run (hidden 256, 4 layers, 4 heads of 64, MLP 688 ≈ 8/3·d)"""


LLAMA_BASE = {
    "model_type": "llama",
    "hidden_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 2512,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
"""the dense Llama of the same size as the Quillan ``base`` preset, for the GPU comparison.

Matched on the architecture: the same hidden size (768), layers (8), query/key-value heads
(12/4 of 64), maximum positions, and a tied embedding, so embeddings, attention and norms are
identical in size. The MLP width is solved so that the parameter count equals Quillan base's
*active* parameters per token (``policies.count_parameters(config)["active"]``: attention, the
shared expert, the 2 routed persona experts with their micro-swarm queries, sub-keys and
retrieved micro-agents, the routers, the overseer and the persona heads): 8 layers × 3 × 768 ×
I = 46.24M gives I = 2508.9, rounded to the nearest multiple of 16, 2512: 58.96M parameters
against Quillan's 58.90M active (+0.1%) with the 80-token character tokenizer. The embedding
is V × 768 on both sides, so the match holds for any vocabulary. (Quillan base holds 253.8M
parameters in all; the dense model holds only its active count.)"""


LLAMA_PRESETS = {
    "llama-0.5b": {
        "model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 64, "intermediate_size": 5504, "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "llama-1.5b": {
        "model_type": "llama", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 8960, "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}
"""real-size dense Llamas for the GPU runs (random init; tied embeddings, as Qwen2 0.5B/1.5B):
``llama-0.5b``, hidden 1024 × 24 layers, 16 heads of 64 (no GQA), MLP 5504: 506.5M parameters
without the embedding; ``llama-1.5b``, Qwen2-1.5B's shape (hidden 1536 × 28 layers, 12 query / 2
key-value heads of 128, MLP 8960; Qwen2's q/k/v biases left out): 1.31B without the embedding.
The embedding adds vocabulary × hidden (``--vocab 151936``: 155.6M and 233.4M)."""

SIZE_OPTIONS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
                "max_positions": "max_position_embeddings"}
"""command-line option (``--kv-heads`` …) → the Llama config field it sets"""


def add_size_options(parser) -> None:
    """``--hidden --layers --heads --kv-heads --head-dim --intermediate --max-positions --tie-embeddings
    --vocab``: the Llama's sizes, each overriding the chosen ``--model``'s."""
    g = parser.add_argument_group("model size (Llama models; each overrides the --model preset's value)")
    for opt, key in SIZE_OPTIONS.items():
        g.add_argument(f"--{opt.replace('_', '-')}", dest=opt, type=int, default=None, help=key)
    g.add_argument("--tie-embeddings", choices=["true", "false"], default=None,
                   help="tie_word_embeddings (the head's weight is the embedding)")
    g.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size: a tokenizer with this many tokens (the task's characters, then filler "
                        "tokens; bench.common.padded_tokenizer), so every side samples over the whole vocabulary")


def llama_config(base: dict, args, min_positions: int = 0) -> dict:
    """``base`` with the size options of ``args`` applied, and ``max_position_embeddings`` raised to
    ``min_positions`` when it is smaller (prompt + completion must fit)."""
    cfg = dict(base)
    for opt, key in SIZE_OPTIONS.items():
        if getattr(args, opt, None) is not None:
            cfg[key] = getattr(args, opt)
    if getattr(args, "tie_embeddings", None) is not None:
        cfg["tie_word_embeddings"] = args.tie_embeddings == "true"
    if cfg["num_attention_heads"] % cfg.get("num_key_value_heads", cfg["num_attention_heads"]):
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]     # --heads given alone: no grouping
    resized = getattr(args, "hidden", None) is not None or getattr(args, "heads", None) is not None
    if getattr(args, "head_dim", None) is None and (resized or "head_dim" not in cfg):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]     # hidden / heads, as Llama's default
    cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 0), min_positions)
    return cfg


def size_options_given(args) -> list[str]:
    """The size options (other than ``--vocab``) given on the command line."""
    names = [o for o in SIZE_OPTIONS if getattr(args, o, None) is not None]
    return names + (["tie_embeddings"] if getattr(args, "tie_embeddings", None) is not None else [])


FILLER_LETTERS = "abcdefghijklmnopqrstuvwxyz"
FILLER_WIDTH = 4
"""filler tokens are ``<`` + 4 letters + ``>`` (``<aaaa>``, ``<aaab>``, …): no digits (a digit-counting
reward sees only real digit tokens) and never one of the 3-letter special tokens"""


def padded_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` tokens: the character tokenizer of
    ``ccrl.data.default_tokenizer()`` (special tokens, then every character of the built-in tasks;
    prompts encode as they do there) followed by filler tokens up to the size. Encoding text never
    yields a filler (every character is its own token); a model can sample any of them, and decoding
    writes their names, so completions are drawn over the whole vocabulary on both sides."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ccrl.data import default_tokenizer

    base = default_tokenizer()
    vocab = dict(sorted(base.get_vocab().items(), key=lambda kv: kv[1]))
    if vocab_size < len(vocab):
        raise ValueError(f"--vocab {vocab_size}: the task's characters and special tokens need {len(vocab)}")
    most = len(vocab) + len(FILLER_LETTERS) ** FILLER_WIDTH
    if vocab_size > most:
        raise ValueError(f"--vocab {vocab_size}: at most {most} tokens (the filler names run out)")
    n = len(FILLER_LETTERS)
    for i in range(vocab_size - len(vocab)):
        name = "".join(FILLER_LETTERS[(i // n ** k) % n] for k in reversed(range(FILLER_WIDTH)))
        vocab[f"<{name}>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=base.unk_token))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=base.pad_token, bos_token=base.bos_token,
                                  eos_token=base.eos_token, unk_token=base.unk_token, padding_side="left",
                                  clean_up_tokenization_spaces=False)
    assert len(tok) == vocab_size
    return tok


def bench_tokenizer(vocab_size: int | None = None):
    """The benchmarks' tokenizer: the character tokenizer, or :func:`padded_tokenizer` of ``vocab_size``."""
    if vocab_size is None:
        from ccrl.data import default_tokenizer

        return default_tokenizer()
    return padded_tokenizer(vocab_size)


def parameter_count(config: dict, tokenizer) -> int:
    """Parameters of the model of ``config`` sized to ``tokenizer`` (built on the meta device; tied counted once)."""
    with torch.device("meta"):
        model = hf_model(config, tokenizer)
    return sum(p.numel() for p in model.parameters())


def hf_model(config: dict, tokenizer, seed: int = 0, **overrides):
    """A randomly initialised ``AutoModelForCausalLM`` of ``config`` (e.g. :data:`TINY_LLAMA`) sized to ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {**config, **overrides}
    model_type = hf.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **hf)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised ``LlamaForCausalLM`` of :data:`TINY_LLAMA` sized to ``tokenizer``."""
    return hf_model(TINY_LLAMA, tokenizer, seed, **overrides)


def quillan(preset: str, tokenizer, seed: int = 0, **overrides):
    """A randomly initialised Quillan council policy of ``preset`` sized to ``tokenizer``."""
    from policies import QuillanConfig, QuillanForCausalLM

    cfg = QuillanConfig.preset(preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    return QuillanForCausalLM(cfg)


def digit_share(prompts, completions, **kwargs) -> list[float]:
    """Share of digit characters in each completion: a dense reward, so (unlike exact match on an
    untrained model) almost every group of completions has reward variance and a gradient."""
    return share_of(completions, DIGITS)


DIGITS = frozenset("0123456789")
CHAR_SHARE_SET = DIGITS | frozenset("abcdefghijklm")


def share_of(completions, chars: frozenset) -> list[float]:
    """Per completion, the share of its characters that are in ``chars`` (0 for an empty one)."""
    return [sum(c in chars for c in s) / max(1, len(s)) for s in completions]


def char_share(prompts, completions, **kwargs) -> list[float]:
    """Share of the completion's characters that are digits or the letters a–m: dense at any
    vocabulary. Under :func:`padded_tokenizer` an untrained model samples mostly filler tokens, whose
    names are letters, so :func:`digit_share` scores almost every completion 0 at 32,000 tokens or
    more; then most groups have zero advantage and ccrl skips their rows while TRL trains them, and
    a timing would not compare equal work. Each filler name has 4 letters, each in a–m about half
    the time, so every group of completions has reward variance here too."""
    return share_of(completions, CHAR_SHARE_SET)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_lines(threads: int, device: str = "cpu") -> list[str]:
    """Versions and hardware, one ``key: value`` per line (``device="cuda"`` adds the GPU and CUDA)."""
    import importlib.metadata as md

    vers = [f"python {platform.python_version()}"]
    for pkg in ("ccrl", "torch", "transformers", "trl", "accelerate", "peft"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f} at start"
    lines = [
        "versions: " + ", ".join(vers),
        f"hardware: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {threads}{load}",
    ]
    if device == "cuda":
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
        lines[0] += f", CUDA {torch.version.cuda}"
        lines.append(f"gpu: {torch.cuda.get_device_name(i)} (compute capability {cap}, "
                     f"{props.total_memory / 2**30:.1f} GiB), {torch.cuda.device_count()} visible")
    return lines


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (right-aligned numbers)."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, width)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in width) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
