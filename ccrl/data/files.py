"""User data files: local json / jsonl / parquet / csv, loaded through Hugging Face ``datasets``.

``load_rows(path, kind, columns=None, split=None)`` returns a list of dicts, one per
row, after renaming columns (``columns`` maps the file's column names to ours) and
checking every row for its ``kind``:

=============  ==============================  ===================================
kind           required (non-empty strings)    optional
=============  ==============================  ===================================
``rl``         ``prompt``                      ``answer`` (string or null)
``sft``        ``prompt``, ``answer``
``preference`` ``prompt``, ``chosen``,
               ``rejected``
``pretrain``   ``text``
=============  ==============================  ===================================

Other columns are kept as they are: they reach reward functions as keyword arguments.
Every problem is a ``DataError`` naming the file, and for a bad value the row number
(1-based, counting data rows only: a CSV header is not a row) and the column.

``split``: None returns every row; "train" or "heldout" returns the rows whose prompt
(``text`` for pretraining) falls in that split by the same stable hash the built-in
tasks use, so a file can be trained on and evaluated without overlap. ``heldout_fraction``
(default 0.1) is the share of prompts the hash puts in "heldout"; 0 puts every row in "train".
A recipe sets it with ``data.heldout_fraction``, or gives a separate held-out file with
``data.eval_path`` (then every row of ``data.path`` is trained on).

CSV columns are read as strings (an answer "046" stays "046"); json and parquet keep
their types, so a number where a string is required is reported, not converted.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

from ccrl.data.tasks import DEFAULT_HELDOUT_FRACTION, SPLITS, Example, split_of
from ccrl.errors import DataError

KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required non-empty string columns, optional string-or-null columns)
    "rl": (("prompt",), ("answer",)),
    "sft": (("prompt", "answer"), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "pretrain": (("text",), ()),
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
    required, optional = KINDS[kind]
    present = [columns.get(c, c) if columns else c for c in present]
    for col in required:
        if col not in present:
            raise DataError(
                f"data file {path}: missing column {col!r} (needed for kind {kind!r}); the file has columns "
                f"{present}; map one of them with columns: {{your_name: {col}}}"
            )
    for i, row in enumerate(rows, start=1):
        for col in required:
            _check_value(row.get(col), path, i, col, optional=False)
        for col in optional:
            if col in row:
                _check_value(row[col], path, i, col, optional=True)

    if split is None:
        return rows
    key = "text" if kind == "pretrain" else "prompt"
    chosen = [row for row in rows if split_of(row[key], heldout_fraction) == split]
    if not chosen and not (split == "heldout" and heldout_fraction == 0):
        warnings.warn(
            f"data file {path}: none of its {len(rows)} rows falls in the {split!r} split", stacklevel=2
        )
    return chosen


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


def examples_from_rows(rows: list[dict[str, Any]]) -> list[Example]:
    """``Example``s from validated rows: prompt and answer, every other column in ``extra``.

    Pretraining rows (``text``) become ``Example(prompt=text, answer=None)``; preference
    rows keep ``chosen`` and ``rejected`` in ``extra``.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        if "prompt" in row:
            prompt, taken = row["prompt"], ("prompt", "answer")
        elif "text" in row:
            prompt, taken = row["text"], ("text", "answer")
        else:
            raise DataError(f"row {i} has neither a 'prompt' nor a 'text' column; it has {sorted(row)}")
        extra = {k: v for k, v in row.items() if k not in taken}
        out.append(Example(prompt=prompt, answer=row.get("answer"), extra=extra))
    return out


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
