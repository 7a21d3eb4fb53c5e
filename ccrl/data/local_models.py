"""Tiny local chat models: Hugging Face model folders built here, nothing downloaded.

``write_chat_model(path, architecture="qwen2")`` writes a folder that loads like a chat checkpoint
from the Hub (``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``):
``config.json`` and ``model.safetensors`` of a randomly initialised causal LM, and a byte-level
BPE tokenizer (trained with the ``tokenizers`` library on a small corpus, so every string
encodes) saved as a ``PreTrainedTokenizerFast`` with a Jinja chat template. Two families, with
their own special tokens, as the real checkpoints have them:

===============  =====================================  ===============================================
architecture     chat template                          special tokens
===============  =====================================  ===============================================
``qwen2``        ChatML: ``<|im_start|>role\\n...``      eos ``<|im_end|>`` (the end of a turn), pad
                 ``<|im_end|>\\n``                       ``<|endoftext|>``, no bos
``llama``        Llama 3: ``<|start_header_id|>role``   bos ``<|begin_of_text|>``, eos ``<|eot_id|>``
                 ``<|end_header_id|>\\n\\n...<|eot_id|>``   (the end of a turn), **no pad token**
===============  =====================================  ===============================================

The EOS is the end-of-turn token in both, so a model stops at the end of its reply. Sizes are
tiny by default (hidden 32, 2 layers): the folders serve tests and CPU example recipes.
``chat_template=False`` writes a tokenizer without a template (for the error it must give).

    from ccrl.data.local_models import write_chat_model
    folder = write_chat_model("models/tiny-qwen2", architecture="qwen2")
    # recipe: model: {checkpoint: models/tiny-qwen2, council_head: true}

The tokenizer is ``rewards.testing.build_tokenizer``'s (the one builder of these BPE tokenizers,
shared with the tiny reward models and judges). ``python -m ccrl.data.local_models OUT`` writes
the two folders of ``recipes/chat_reward_model.yaml``: ``OUT/policy`` (a Qwen2 chat policy) and
``OUT/reward`` (a Qwen2 reward model with the same tokenizer).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rewards.testing import CHATML_TEMPLATE, LLAMA3_TEMPLATE, tokenizer_family  # noqa: F401  (re-exported)

ARCHITECTURES = ("qwen2", "llama")
"""Architectures with a chat template family of the same name in ``rewards.testing.FAMILIES``."""

DEFAULT_CORPUS = (
    "user", "assistant", "system", "You are a helpful assistant.", "What is 2+2?", "The answer is 4.",
    "Hello! How can I help you today?", "Say yes or no.", "yes", "no", "The sky is blue.",
    "0 1 2 3 4 5 6 7 8 9 + - * = ? ! . ,",
)


def chat_tokenizer(architecture: str = "qwen2", corpus: Iterable[str] | None = None, vocab_size: int = 300,
                   chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the family's special tokens and chat template
    (built by ``rewards.testing.build_tokenizer``, the one builder of these tokenizers)."""
    from rewards.testing import build_tokenizer

    _family(architecture)
    return build_tokenizer(family=architecture, vocab_size=vocab_size, chat_template=chat_template,
                           corpus=list(corpus or DEFAULT_CORPUS))


def chat_model_config(architecture: str, tokenizer, hidden_size: int = 32, num_layers: int = 2,
                      num_heads: int = 2, intermediate_size: int = 64, max_positions: int = 256):
    """A small transformers config of ``architecture`` sized to ``tokenizer``'s vocabulary and specials."""
    from transformers import AutoConfig

    _family(architecture)
    return AutoConfig.for_model(
        architecture, vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def write_chat_model(path: str | Path, architecture: str = "qwen2", *, corpus: Iterable[str] | None = None,
                     vocab_size: int = 300, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                     chat_template: bool = True, seed: int = 0) -> Path:
    """Write a tiny chat checkpoint folder (see the module docstring); returns its path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = chat_tokenizer(architecture, corpus, vocab_size, chat_template)
    cfg = chat_model_config(architecture, tok, hidden_size, num_layers, num_heads, intermediate_size=2 * hidden_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _family(architecture: str) -> dict:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: expected one of {list(ARCHITECTURES)}")
    return tokenizer_family(architecture)


# --------------------------------------------------------------------------- the chat example's models

EXAMPLE_CORPUS = (
    "user", "assistant", "system", "Reply with the number only.",
    "What is 3 plus 4?", "How much is 9 minus 5?", "Compute 6 plus 2.", "plus minus",
    " ".join(str(i) for i in range(100)),
)
"""The tokenizer corpus of the example's two models (recipes/chat_reward_model.yaml's questions)."""


def write_example_models(out: str | Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                         seed: int = 0) -> dict[str, Path]:
    """Write ``out/policy`` (a tiny random Qwen2 chat policy) and ``out/reward`` (a tiny random Qwen2
    reward model, one label) for ``recipes/chat_reward_model.yaml``. Both have the same ChatML
    tokenizer (one corpus, one vocabulary), as a policy and a reward model of one family do."""
    from rewards.testing import build_reward_model

    out = Path(out)
    policy = write_chat_model(out / "policy", "qwen2", corpus=EXAMPLE_CORPUS, hidden_size=hidden_size,
                              num_layers=num_layers, num_heads=num_heads, seed=seed)
    reward = build_reward_model(out / "reward", family="qwen2", corpus=EXAMPLE_CORPUS, vocab_size=300,
                                model_type="qwen2", seed=seed + 1)
    return {"policy": policy, "reward": reward}


def main(argv: list[str] | None = None) -> int:
    """``python -m ccrl.data.local_models OUT``: write the example's two model folders under OUT."""
    import argparse

    from transformers import AutoConfig

    p = argparse.ArgumentParser(prog="python -m ccrl.data.local_models",
                                description="Write the tiny local models of recipes/chat_reward_model.yaml: "
                                            "OUT/policy (a Qwen2 chat policy) and OUT/reward (a Qwen2 reward model).")
    p.add_argument("out", help="folder to write policy/ and reward/ into (e.g. models/chat-example)")
    args = p.parse_args(argv)
    for role, path in write_example_models(args.out).items():
        cfg = AutoConfig.from_pretrained(path)
        print(f"{role:6s} {path}  ({cfg.architectures[0]}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"vocab {cfg.vocab_size}, ChatML template)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
