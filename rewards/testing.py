"""Tiny local model folders for the model-based rewards: a reward model and a judge, built offline.

    from rewards.testing import build_reward_model, build_judge
    rm = build_reward_model("models/tiny-rm")      # LlamaForSequenceClassification, num_labels=1
    jd = build_judge("models/tiny-judge")          # LlamaForCausalLM
    # recipe: rewards: [{name: reward_model, path: models/tiny-rm}, {name: judge, path: models/tiny-judge}]

Each folder is what ``save_pretrained`` writes for a real checkpoint: ``config.json``,
``model.safetensors`` and the model's own tokenizer (a byte-level BPE trained with the
``tokenizers`` library on a small built-in corpus, wrapped as a ``PreTrainedTokenizerFast`` with a
ChatML chat template, so every string encodes without unknown tokens). The weights are random
(seeded), so the scores mean nothing; the folders exist to exercise the loading, rendering,
batching and error paths without downloading anything.

Why here and not under tests/: the folders are also what an example recipe generates before it
runs (``rewards/`` ships with the distribution, ``tests/`` does not), and they belong to the two
rewards they feed. This module imports only the standard library at import time; torch,
``tokenizers`` and ``transformers`` load when a folder is built, and ``import rewards`` does not
import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML, as Qwen2 uses it (no system prompt is inserted)."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}
"""The default architecture of the built folders (any ``AutoConfig`` fields may override it)."""

_CORPUS = [
    "Prompt:", "Response:", "Question:", "Answer Yes or No.", "Yes", "No", " Yes", " No",
    "Is the response a correct and helpful answer to the prompt?",
    "user", "assistant", "system", "What is 12+34? The answer is 46.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ! ? : ;",
    "the quick brown fox jumps over the lazy dog",
    "Please answer the question. Sure, here is the answer.",
]


def build_tokenizer(*, vocab_size: int = 400, chat_template: bool = True, corpus: list[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (pad, bos, eos, ChatML tokens) trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus or _CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                  clean_up_tokenization_spaces=False)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(tok, overrides: dict[str, Any], **fields: Any):
    from transformers import AutoConfig

    hf = {**TINY_LLAMA, **overrides}
    model_type = hf.pop("model_type")
    return AutoConfig.for_model(model_type, **hf, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **fields)


def build_reward_model(path: str | Path, *, seed: int = 0, chat_template: bool = True,
                       num_labels: int = 1, **config: Any) -> Path:
    """Save a tiny random ``AutoModelForSequenceClassification`` (``num_labels`` labels, default 1)
    and its tokenizer to ``path``; ``config`` overrides :data:`TINY_LLAMA` (e.g. ``model_type="qwen2"``)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer(chat_template=chat_template)
    cfg = _config(tok, config, num_labels=num_labels)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # a visible spread of scores (the default init gives logits near 0)
        model.score.weight.normal_(0.0, 1.0)
    return _save(model, tok, path)


def build_judge(path: str | Path, *, seed: int = 0, chat_template: bool = True, **config: Any) -> Path:
    """Save a tiny random ``AutoModelForCausalLM`` and its tokenizer to ``path`` (overrides as above)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(chat_template=chat_template)
    cfg = _config(tok, config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return _save(model, tok, path)


def _save(model, tok, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
