"""User data files: local json / jsonl / parquet / csv, loaded through Hugging Face ``datasets``.

``load_rows(path, kind, columns=None, split=None)`` returns a list of dicts, one per
row, after renaming columns (``columns`` maps the file's column names to ours) and
checking every row for its ``kind``. Each kind takes plain text or, in TRL's formats,
conversations (lists of messages ``{"role": ..., "content": ...}``):

==============  ===========================================  =====================================
kind            plain text (non-empty strings)               conversational (TRL's formats)
==============  ===========================================  =====================================
``rl``          ``prompt``; optional ``answer``              ``prompt`` as messages ("prompt-only")
                (string or null)                             optional ``answer`` as for plain text
``sft``         ``prompt``, ``answer``                       ``messages`` (a whole conversation:
                                                             "conversational language modeling")
``preference``  ``prompt``, ``chosen``, ``rejected``         ``prompt``, ``chosen``, ``rejected`` as
                                                             messages, or ``chosen`` / ``rejected``
                                                             only (implicit prompt)
``pretrain``    ``text``
==============  ===========================================  =====================================

For example, one jsonl row of each conversational kind::

    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"}                      # rl
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}  # sft
    {"prompt": [{"role": "user", "content": "Sky?"}],                                               # preference
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}]}

A file is one format throughout: the first row decides whether a column holds text or
messages, and a later row of the other format is an error naming it. A preference row with
an implicit prompt gets one here: the longest common prefix of whole messages of ``chosen``
and ``rejected`` becomes ``prompt`` (``trl.extract_prompt``). Messages may carry further keys
(``name``, ...), which reach the chat template.

Conversations are rendered with the tokenizer's chat template by ``examples_from_rows(rows,
tokenizer)`` (``ccrl.data.chat`` says how): an RL or preference prompt with
``add_generation_prompt=True``; an SFT conversation turn by turn, the loss on the assistant
turns only. A tokenizer without a chat template is an error naming the file and column.

Other columns are kept as they are: they reach reward functions as keyword arguments (for
conversational rows, reward functions get the prompt as its message list and each completion as
``[{"role": "assistant", "content": text}]``, as TRL passes them; see ``ccrl.scoring``).
Every problem is a ``DataError`` naming the file, and for a bad value the row number
(1-based, counting data rows only: a CSV header is not a row) and the column.

``split``: None returns every row; "train" or "heldout" returns the rows whose prompt
(``text`` for pretraining; for conversations the messages of the prompt, or of an SFT
conversation up to its last assistant turn, as canonical JSON) falls in that split by the same
stable hash the built-in tasks use, so a file can be trained on and evaluated without overlap.
``heldout_fraction`` (default 0.1) is the share of prompts the hash puts in "heldout"; 0 puts
every row in "train". A recipe sets it with ``data.heldout_fraction``, or gives a separate
held-out file with ``data.eval_path`` (then every row of ``data.path`` is trained on).

CSV columns are read as strings (an answer "046" stays "046"); json and parquet keep
their types, so a number where a string is required is reported, not converted.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

from ccrl.data.chat import (
    check_conversation,
    conversation_key,
    extract_prompt,
    is_conversation,
    last_reply_split,
)
from ccrl.data.tasks import DEFAULT_HELDOUT_FRACTION, SPLITS, Example, split_of
from ccrl.errors import DataError

KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required non-empty string columns, optional string-or-null columns) of plain-text rows
    "rl": (("prompt",), ("answer",)),
    "sft": (("prompt", "answer"), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "pretrain": (("text",), ()),
}
CONVERSATIONAL: dict[str, tuple[tuple[str, ...], ...]] = {
    # kind: the accepted sets of message-list columns, in the order they are recognised
    "rl": (("prompt",),),
    "sft": (("messages",),),
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
}
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(
    path: str | Path,
    kind: str,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[dict[str, Any]]:
    """Rows of a local data file, renamed with ``columns`` and validated for ``kind``."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {sorted(KINDS)}")
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)} or None for all rows")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"data file {path}: unsupported extension {path.suffix!r}; expected one of {sorted(FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if fmt != "parquet":
        check_utf8(path)

    rows, present = _read(path, fmt)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    rows = _rename(rows, present, columns or {}, path)
    present = [columns.get(c, c) if columns else c for c in present]
    chat = _conversational_columns(kind, rows[0], present)
    if chat:
        _check_conversational(rows, kind, chat, path)
    else:
        _check_plain(rows, kind, present, path)

    if split is None:
        return rows
    chosen = [row for row in rows if split_of(split_key(row), heldout_fraction) == split]
    if not chosen and not (split == "heldout" and heldout_fraction == 0):
        warnings.warn(
            f"data file {path}: none of its {len(rows)} rows falls in the {split!r} split", stacklevel=2
        )
    return chosen


def split_key(row: dict[str, Any]) -> str:
    """The string whose hash decides a validated row's split: its prompt (``text`` for pretraining);
    for conversations, the prompt's messages (an SFT conversation's up to its last assistant turn)."""
    if "messages" in row and is_conversation(row["messages"]):
        return conversation_key(last_reply_split(row["messages"])[0])
    key = row["prompt"] if "prompt" in row else row["text"]
    return conversation_key(key) if isinstance(key, list) else key


def row_texts(row: dict[str, Any]) -> list[str]:
    """The text of a validated row (its string values and every message's content): a tokenizer corpus."""
    out: list[str] = []
    for v in row.values():
        if isinstance(v, str):
            out.append(v)
        elif is_conversation(v):
            out.extend(m["content"] for m in v if isinstance(m.get("content"), str))
    return out


def _conversational_columns(kind: str, first: dict[str, Any], present: list[str]) -> tuple[str, ...]:
    """The message-list columns of a file of ``kind`` (empty for plain text), judged by its first row."""
    for cols in CONVERSATIONAL.get(kind, ()):
        if cols[0] != "prompt" and "prompt" in present:   # a prompt column decides the format itself
            continue
        if all(c in present for c in cols) and isinstance(first.get(cols[0]), list):
            return cols
    return ()


def _check_plain(rows: list[dict], kind: str, present: list[str], path: Path) -> None:
    required, optional = KINDS[kind]
    if kind == "sft" and isinstance(rows[0].get("prompt"), list):
        raise DataError(f"data file {path}, row 1, column 'prompt': an SFT conversation is one 'messages' column "
                        f"(the whole conversation, user and assistant turns; TRL's conversational language-modeling "
                        f"format), not a prompt of messages")
    for col in required:
        if col not in present:
            hint = ""
            if kind == "sft" and "messages" in present:
                hint = "; a 'messages' column must hold lists of {role, content} messages"
            raise DataError(
                f"data file {path}: missing column {col!r} (needed for kind {kind!r}); the file has columns "
                f"{present}; map one of them with columns: {{your_name: {col}}}{hint}"
            )
    for i, row in enumerate(rows, start=1):
        for col in required:
            _check_value(row.get(col), path, i, col, optional=False)
        for col in optional:
            if col in row:
                _check_value(row[col], path, i, col, optional=True)

def check_utf8(path: str | Path, what: str = "data file") -> str:
    """The text of ``path``; a ``DataError`` naming the file, the byte offset and the line of the
    first byte that is not UTF-8 (json, jsonl and csv files must be UTF-8, as ``datasets`` reads them)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(utf8_message(path, raw, e, what)) from None


def utf8_message(path, raw: bytes, e: UnicodeDecodeError, what: str) -> str:
    line = raw.count(b"\n", 0, e.start) + 1
    return (f"{what} {path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}) cannot be "
            f"decoded; save the file with UTF-8 encoding")


def _check_conversational(rows: list[dict], kind: str, chat: tuple[str, ...], path: Path) -> None:
    """Check message lists (normalised in place: null extra keys dropped) and give preference rows
    with an implicit prompt their ``prompt``."""
    for i, row in enumerate(rows, start=1):
        for col in chat:
            where = f"data file {path}, row {i}, column {col!r}"
            value = row.get(col)
            if isinstance(value, str):
                raise DataError(f"{where}: expected a list of messages like row 1, got a string {value!r}; a file "
                                f"is either plain text or conversational throughout")
            row[col] = _clean_messages(check_conversation(value, where))
        if kind == "rl" and "answer" in row:
            _check_value(row["answer"], path, i, "answer", optional=True)
        if kind == "preference" and "prompt" not in chat:
            row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
            if not row["prompt"]:
                raise DataError(f"data file {path}, row {i}: 'chosen' and 'rejected' share no leading message, so "
                                f"there is no prompt; give a 'prompt' column or start both with the same messages")
        if kind == "preference":
            for col in ("chosen", "rejected"):
                if not row[col]:
                    raise DataError(f"data file {path}, row {i}, column {col!r}: no message after the prompt")
        if kind == "sft" and not any(m["role"] == "assistant" for m in row["messages"]):
            raise DataError(f"data file {path}, row {i}, column 'messages': no assistant message to train on")


def _clean_messages(messages: list[dict]) -> list[dict]:
    # a parquet/json struct column fills every key any message has; a None there is not the user's
    return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")} for m in messages]


def examples_from_rows(
    rows: list[dict[str, Any]], tokenizer=None, source: str | Path | None = None
) -> list[Example]:
    """``Example``s from validated rows: prompt and answer, every other column in ``extra``.

    Pretraining rows (``text``) become ``Example(prompt=text, answer=None)``; preference
    rows keep ``chosen`` and ``rejected`` in ``extra``. Conversational rows are rendered with
    ``tokenizer``'s chat template (``ccrl.data.chat``): ``prompt`` is the rendered text and
    ``messages`` the prompt's message list; an SFT row also keeps its whole conversation in
    ``conversation``, and a preference row's ``chosen`` / ``rejected`` become the rendered
    completions (the template's end of turn included, so no EOS is added to them). ``source`` (the file) names the rows in errors.
    """
    out = []
    where = f"data file {source}" if source is not None else "data"
    for i, row in enumerate(rows, start=1):
        conversational = isinstance(row.get("prompt"), list) or isinstance(row.get("messages"), list)
        if conversational:
            out.append(_conversational_example(row, tokenizer, f"{where}, row {i}"))
            continue
        if "prompt" in row:
            prompt, taken = row["prompt"], ("prompt", "answer")
        elif "text" in row:
            prompt, taken = row["text"], ("text", "answer")
        else:
            raise DataError(f"row {i} has neither a 'prompt' nor a 'text' column; it has {sorted(row)}")
        extra = {k: v for k, v in row.items() if k not in taken}
        out.append(Example(prompt=prompt, answer=row.get("answer"), extra=extra))
    return out


def _conversational_example(row: dict[str, Any], tokenizer, where: str) -> Example:
    from ccrl.data import chat

    column = "messages" if isinstance(row.get("messages"), list) else "prompt"
    chat.require_template(tokenizer, f"{where}, column {column!r}")
    if column == "messages":   # SFT: train on the assistant turns; evaluate on the last one's prompt
        conversation = row["messages"]
        prompt_messages, _ = chat.last_reply_split(conversation)
        chat.conversation_segments(tokenizer, conversation, f"{where}, column 'messages'")   # fail here, not mid-stage
        extra = {k: v for k, v in row.items() if k not in ("messages", "answer")}
        return Example(prompt=chat.render_prompt(tokenizer, prompt_messages, f"{where}, column 'messages'"),
                       answer=row.get("answer"), extra=extra, messages=prompt_messages, conversation=conversation)
    messages = row["prompt"]
    extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
    if "chosen" in row and isinstance(row["chosen"], list):
        prompt, chosen, rejected = chat.render_pair(tokenizer, messages, row["chosen"], row["rejected"],
                                                    f"{where}, columns 'prompt'/'chosen'/'rejected'")
        extra.update(chosen=chosen, rejected=rejected)
    else:
        prompt = chat.render_prompt(tokenizer, messages, f"{where}, column 'prompt'")
    return Example(prompt=prompt, answer=row.get("answer"), extra=extra, messages=messages)


def _read(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, column names in file order) through ``datasets``."""
    import datasets
    from datasets import Features, Value, load_dataset

    kwargs: dict[str, Any] = {}
    if fmt == "csv":  # every column as a string: "046" must not become the number 46
        header = _csv_header(path)
        kwargs["features"] = Features({name: Value("string") for name in header})
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a local file loads in a blink: keep the console for training
    try:
        dataset = load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(_explain_unreadable(path, fmt, err)) from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    rows = dataset.to_list()
    if fmt == "json" and any(type(f).__name__ == "Json" for f in dataset.features.values()):
        # a column mixing types (say "2" and 4) comes back JSON-decoded, turning "2" into 2;
        # take such rows as the file wrote them, so errors name the value that is wrong
        raw = _raw_json_rows(path)
        if raw is not None and len(raw) == len(rows):
            rows = raw
    return rows, list(dataset.column_names)


def _raw_json_rows(path: Path) -> list[dict] | None:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError:
        return None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if not header or any(not h.strip() for h in header):
        raise DataError(
            f"data file {path}: the first line must be a header naming every column, got {header}"
        )
    if len(set(header)) != len(header):
        raise DataError(f"data file {path}: the header repeats a column name: {header}")
    return header


def _explain_unreadable(path: Path, fmt: str, err: Exception) -> str:
    """The best message we can give for a file ``datasets`` could not parse."""
    if fmt == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix.lower() == ".jsonl":
            for line_no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"data file {path}: line {line_no} is not valid JSON ({bad.msg})"
                if not isinstance(value, dict):
                    return f"data file {path}: line {line_no} is not a JSON object (one object per line expected)"
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as bad:
                return (
                    f"data file {path}: not valid JSON at line {bad.lineno}, column {bad.colno} ({bad.msg})"
                )
            if isinstance(value, list):
                for i, item in enumerate(value, start=1):
                    if not isinstance(item, dict):
                        return f"data file {path}: row {i} is not a JSON object"
    cause = str(err.__cause__ or err).strip().splitlines()
    return f"data file {path} could not be read as {fmt}: {cause[-1] if cause else type(err).__name__}"


def _rename(rows: list[dict], present: list[str], columns: dict[str, str], path: Path) -> list[dict]:
    if not columns:
        return rows
    if not isinstance(columns, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in columns.items()
    ):
        raise DataError(
            f"data file {path}: the column mapping must map file column names to names, got {columns!r}"
        )
    for source, target in columns.items():
        if source not in present:
            raise DataError(
                f"data file {path}: column {source!r} (mapped to {target!r}) is not in the file; "
                f"the file has columns {present}"
            )
        if target in present and target not in columns:
            raise DataError(
                f"data file {path}: mapping column {source!r} to {target!r} would clash with the file's own "
                f"column {target!r}; map or rename that one too"
            )
    targets = list(columns.values())
    if len(set(targets)) != len(targets):
        raise DataError(
            f"data file {path}: the column mapping sends two columns to the same name: {columns!r}"
        )
    return [{columns.get(k, k): v for k, v in row.items()} for row in rows]


def _check_value(value: Any, path: Path, row: int, col: str, optional: bool) -> None:
    where = f"data file {path}, row {row}, column {col!r}"
    if value is None:
        if optional:
            return
        raise DataError(f"{where}: the value is missing (null)")
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise DataError(f"{where}: the value is empty" + ("; use null for no value" if optional else ""))
