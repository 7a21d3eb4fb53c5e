"""Data: verifiable synthetic tasks, user data files, and the tokenizer.

Tasks (deterministic generators whose answers a program checks)::

    from ccrl.data import get_task
    task = get_task("arithmetic", ops="+-*", digits=2)
    train = task.examples("train", 1000, seed=0)     # [Example(prompt="12+34=", answer="46"), ...]
    task.is_correct(" 46 ", train[0])                 # held-out accuracy check

Built-in tasks: ``arithmetic``, ``reverse``, ``sort``, ``rules`` (refusals required by a
constitution). Train and held-out splits never share a problem (a stable hash of the
problem decides its split).

User files (json / jsonl / parquet / csv through Hugging Face ``datasets``)::

    rows = load_rows("data.jsonl", kind="sft", columns={"question": "prompt", "solution": "answer"})
    examples = examples_from_rows(rows, tokenizer)   # conversations rendered with its chat template

Rows may be TRL's conversational formats (``prompt`` / ``chosen`` / ``rejected`` as message
lists, SFT ``messages``); ``ccrl.data.files`` lists the formats and ``ccrl.data.chat`` says how
they are rendered and where SFT's assistant-only loss mask comes from.

Local chat checkpoints for tests and examples (nothing downloaded):
``ccrl.data.local_models.write_chat_model(folder, architecture="qwen2" | "llama")``;
``python -m ccrl.data.local_models OUT`` writes the chat example's policy and reward model.

Tokenizer: ``build_tokenizer(corpus, kind="char" | "bpe")``, ``default_tokenizer()``.

Importing this package loads only the standard library; ``datasets``, ``transformers``,
``tokenizers`` and ``yaml`` load inside the functions that need them.
"""

from __future__ import annotations

from ccrl.data import arithmetic, rules, sequences  # noqa: F401  (registers the built-in tasks)
from ccrl.data.files import examples_from_rows, load_rows
from ccrl.data.tasks import Example, Task, alphabet, get_task, list_tasks, register_task, split_of
from ccrl.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, default_tokenizer, load_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "Example",
    "Task",
    "alphabet",
    "build_tokenizer",
    "default_tokenizer",
    "examples_from_rows",
    "get_task",
    "list_tasks",
    "load_rows",
    "load_tokenizer",
    "register_task",
    "split_of",
]
