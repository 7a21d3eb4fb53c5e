"""Shared pieces of the benchmarks against peers: the tiny Llama, the environment header, medians.

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
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


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
