"""Tiny local model folders, built offline: one BPE-with-chat-template tokenizer builder, a reward
model and a judge (``ccrl.data.local_models`` builds its chat policies on the same tokenizer).

    from rewards.testing import build_reward_model, build_judge
    rm = build_reward_model("models/tiny-rm")      # LlamaForSequenceClassification, num_labels=1
    jd = build_judge("models/tiny-judge")          # LlamaForCausalLM
    rm = build_reward_model("models/rm-qwen2", family="qwen2", model_type="qwen2")   # Qwen2's ChatML tokens
    # recipe: rewards: [{name: reward_model, path: models/tiny-rm}, {name: judge, path: models/tiny-judge}]

Each folder is what ``save_pretrained`` writes for a real checkpoint: ``config.json``,
``model.safetensors`` and the model's own tokenizer (a byte-level BPE trained with the
``tokenizers`` library on a small corpus, wrapped as a ``PreTrainedTokenizerFast`` with a chat
template, so every string encodes without unknown tokens). The weights are random (seeded), so the
scores mean nothing; the folders exist to exercise the loading, rendering, batching and error
paths without downloading anything.

Tokenizer families (``build_tokenizer(family=...)``), each with its own special tokens:

===========  ==============================================  ================================================
family       chat template                                   special tokens
===========  ==============================================  ================================================
``chatml``   ChatML: ``<|im_start|>role\\n...<|im_end|>\\n``  pad ``<pad>``, bos ``<s>``, eos ``</s>``; ChatML
             (the default of the reward model and judge)     markers as additional special tokens
``qwen2``    ChatML, as Qwen2 has it                         eos ``<|im_end|>`` (the end of a turn), pad
                                                             ``<|endoftext|>``, no bos
``llama``    Llama 3: ``<|start_header_id|>role``            bos ``<|begin_of_text|>``, eos ``<|eot_id|>``
             ``<|end_header_id|>\\n\\n...<|eot_id|>``         (the end of a turn), **no pad token**
===========  ==============================================  ================================================

Why here and not under tests/: the folders are also what an example recipe generates before it
runs (``rewards/`` ships with the distribution, ``tests/`` does not), and they belong to the two
rewards they feed. This module imports only the standard library at import time; torch,
``tokenizers`` and ``transformers`` load when a folder is built, and ``import rewards`` does not
import this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as Qwen2 uses it (no system prompt is inserted)."""

CHAT_TEMPLATE = CHATML_TEMPLATE
"""The reward model's and judge's default template (the ``chatml`` family's)."""

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
"""The ``chatml`` family's special tokens."""

FAMILIES: dict[str, dict[str, Any]] = {
    "chatml": {
        "specials": SPECIAL_TOKENS,
        "tokens": {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
        "template": CHATML_TEMPLATE,
    },
    "qwen2": {
        "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": CHATML_TEMPLATE,
    },
    "llama": {
        "specials": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"),
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3_TEMPLATE,
    },
}
"""Tokenizer families: the special tokens the BPE reserves, the tokenizer's named tokens, the template."""

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


def build_tokenizer(*, family: str = "chatml", vocab_size: int = 400, chat_template: bool = True,
                    corpus: Iterable[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``family``'s special tokens and chat template
    (see the module docstring), trained on ``corpus``; ``chat_template=False`` leaves the template out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = tokenizer_family(family)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam["specials"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus or _CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=fam["template"] if chat_template else None,
                                   clean_up_tokenization_spaces=False, **fam["tokens"])


def tokenizer_family(family: str) -> dict[str, Any]:
    """The entry of :data:`FAMILIES` for ``family``; an unknown name is a ``ValueError`` listing them."""
    if family not in FAMILIES:
        raise ValueError(f"tokenizer family {family!r}: expected one of {list(FAMILIES)}")
    return FAMILIES[family]


def _config(tok, overrides: dict[str, Any], **fields: Any):
    from transformers import AutoConfig

    hf = {**TINY_LLAMA, **overrides}
    model_type = hf.pop("model_type")
    return AutoConfig.for_model(model_type, **hf, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **fields)


def build_reward_model(path: str | Path, *, seed: int = 0, chat_template: bool = True, num_labels: int = 1,
                       family: str = "chatml", corpus: Iterable[str] | None = None, vocab_size: int = 400,
                       **config: Any) -> Path:
    """Save a tiny random ``AutoModelForSequenceClassification`` (``num_labels`` labels, default 1)
    and its tokenizer (``build_tokenizer(family=, corpus=, vocab_size=)``) to ``path``; ``config``
    overrides :data:`TINY_LLAMA` (e.g. ``model_type="qwen2"``)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer(family=family, vocab_size=vocab_size, chat_template=chat_template, corpus=corpus)
    cfg = _config(tok, config, num_labels=num_labels)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # a visible spread of scores (the default init gives logits near 0)
        model.score.weight.normal_(0.0, 1.0)
    return _save(model, tok, path)


def build_judge(path: str | Path, *, seed: int = 0, chat_template: bool = True, family: str = "chatml",
                corpus: Iterable[str] | None = None, vocab_size: int = 400, **config: Any) -> Path:
    """Save a tiny random ``AutoModelForCausalLM`` and its tokenizer to ``path`` (arguments as above)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(family=family, vocab_size=vocab_size, chat_template=chat_template, corpus=corpus)
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
