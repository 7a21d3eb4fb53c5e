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
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ARCHITECTURES = ("qwen2", "llama")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_FAMILIES = {
    "qwen2": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": CHATML_TEMPLATE,
    },
    "llama": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"],
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3_TEMPLATE,
    },
}

DEFAULT_CORPUS = (
    "user", "assistant", "system", "You are a helpful assistant.", "What is 2+2?", "The answer is 4.",
    "Hello! How can I help you today?", "Say yes or no.", "yes", "no", "The sky is blue.",
    "0 1 2 3 4 5 6 7 8 9 + - * = ? ! . ,",
)


def chat_tokenizer(architecture: str = "qwen2", corpus: Iterable[str] | None = None, vocab_size: int = 300,
                   chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = _family(architecture)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam["specials"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=fam["template"] if chat_template else None,
                                   clean_up_tokenization_spaces=False, **fam["tokens"])


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
    if architecture not in _FAMILIES:
        raise ValueError(f"architecture {architecture!r}: expected one of {list(ARCHITECTURES)}")
    return _FAMILIES[architecture]
