"""Tokenizers trained on a task corpus, saved and loaded as ``PreTrainedTokenizerFast``.

Two kinds, both built with the ``tokenizers`` library:

- ``char``: one token per character (a WordLevel model over the corpus's characters with
  a pre-tokenizer that isolates every character, and a ``Fuse`` decoder), so
  ``decode(encode(s)) == s`` exactly, spaces included, for any ``s`` whose characters
  occur in the corpus. The vocabulary is the four special tokens followed by the
  corpus's characters in sorted order: the same corpus always gives the same ids.
- ``bpe``: a small character BPE (``vocab_size``, default 256). Text is first cut at
  every whitespace and punctuation character and between digits (numbers are spelled
  digit by digit, as in Llama), then merges join letters; the cuts never drop a
  character, so decoding is exact here too.

Special tokens: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, set as the pad, bos,
eos and unk tokens. Encoding does NOT add ``<bos>`` or ``<eos>`` (there is no
post-processor): callers append ``eos_token_id`` to targets themselves. Padding is on
the left (``padding_side="left"``), as batched generation needs. Characters absent
from the corpus encode to ``<unk>``. ``clean_up_tokenization_spaces`` is off, so
decoding never edits spaces around punctuation.

``transformers`` and ``tokenizers`` are imported inside the functions, so importing
``ccrl.data`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ccrl.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
"""in id order: pad 0, bos 1, eos 2, unk 3"""
KINDS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 256


def build_tokenizer(
    corpus: Iterable[str], kind: str = "char", vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on ``corpus`` (see the module docstring for the two kinds).

    ``vocab_size``: for ``bpe`` the target size (default 256; the trainer never drops a
    corpus character, so the result may exceed a too-small target); for ``char`` an upper
    bound that is checked (the vocabulary is exactly the specials plus the characters).
    """
    texts = list(corpus)
    if not all(isinstance(t, str) for t in texts):
        raise DataError("tokenizer corpus: every item must be a string")
    chars = sorted(set("".join(texts)))
    if not chars:
        raise DataError("tokenizer corpus is empty: it has no characters to build a vocabulary from")
    if kind == "char":
        backend = _char_backend(chars, vocab_size)
    elif kind == "bpe":
        backend = _bpe_backend(texts, chars, vocab_size)
    else:
        raise DataError(f"unknown tokenizer kind {kind!r}; expected one of {list(KINDS)}")
    return _wrap(backend)


def default_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer over ``ccrl.data.alphabet()``: serves every built-in task, same ids every time."""
    from ccrl.data.tasks import alphabet

    return build_tokenizer([alphabet()], kind="char")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` (a checkpoint directory)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json; expected a directory written by save_pretrained"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _char_backend(chars: list[str], vocab_size: int | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    if vocab_size is not None and vocab_size < len(vocab):
        raise DataError(
            f"char tokenizer needs {len(vocab)} tokens (4 special + {len(vocab) - 4} characters) "
            f"but vocab_size is {vocab_size}"
        )
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # [\s\S] is any character, newline included (Oniguruma's "." stops at newlines)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend


def _bpe_backend(texts: list[str], chars: list[str], vocab_size: int | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
    if isinstance(size, bool) or not isinstance(size, int) or size < len(SPECIAL_TOKENS) + 1:
        raise DataError(
            f"bpe tokenizer: vocab_size must be an int above {len(SPECIAL_TOKENS)}, got {vocab_size!r}"
        )
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s|[^\w\s]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=chars,
        limit_alphabet=len(chars),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _wrap(backend) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    for i, tok in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(tok) != i:  # an invariant of the builders above, not user input
            raise RuntimeError(f"special token {tok} has id {backend.token_to_id(tok)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
