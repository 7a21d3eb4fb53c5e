"""Helpers shared by the built-in rewards: per-sample columns, text extraction, lengths."""

from __future__ import annotations

from typing import Any

from rewards.errors import RewardError

_MISSING = object()


def column(value: Any, n: int, key: str, fn: str, hint: str = "") -> list[Any]:
    """A kwarg as one value per completion: a list/tuple/tensor of length n, or a scalar repeated.

    ``value`` None (the kwarg was not passed) is an error naming the reward and the kwarg.
    """
    if value is None or value is _MISSING:
        extra = f" ({hint})" if hint else ""
        raise RewardError(f"reward {fn!r} needs the keyword argument {key!r}{extra}")
    if hasattr(value, "dim") and value.dim() == 0:  # 0-dim tensor
        return [value.item()] * n
    if isinstance(value, list | tuple) or hasattr(value, "dim"):
        if len(value) != n:
            raise RewardError(f"reward {fn!r}: {key!r} has {len(value)} entries for {n} completions")
        return list(value)
    return [value] * n


def text(item: Any, what: str, fn: str, index: int) -> str:
    """The text of a prompt or completion: a string, or a conversation (list of {role, content})."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "content" in item:
        return str(item["content"])
    if isinstance(item, list | tuple) and all(isinstance(m, dict) and "content" in m for m in item):
        return "\n".join(str(m["content"]) for m in item)
    raise RewardError(
        f"reward {fn!r}: {what}[{index}] is a {type(item).__name__}; expected a string or a list of messages"
    )


def lengths(n: int, fn: str, completion_lengths: Any = None, completion_ids: Any = None) -> list[int]:
    """Generated token counts: ``completion_lengths`` if given, else ``len(completion_ids[i])``."""
    if completion_lengths is not None:
        out = column(completion_lengths, n, "completion_lengths", fn)
    elif completion_ids is not None:
        out = [len(ids) for ids in column(completion_ids, n, "completion_ids", fn)]
    else:
        raise RewardError(
            f"reward {fn!r} needs the completion token counts: pass 'completion_lengths' (list[int]) "
            "or 'completion_ids' (list[list[int]])"
        )
    result = []
    for i, length in enumerate(out):
        length = int(length.item() if hasattr(length, "item") else length)
        if length < 0:
            raise RewardError(f"reward {fn!r}: completion length {length} of sample {i} is negative")
        result.append(length)
    return result


def positive_int(value: Any, key: str, fn: str, allow_zero: bool = False) -> int:
    """A scalar kwarg that must be a positive (or non-negative) integer."""
    if value is None:
        raise RewardError(f"reward {fn!r} needs the keyword argument {key!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RewardError(f"reward {fn!r}: {key}={value!r} is not an integer") from None
    if number < 0 or (number == 0 and not allow_zero) or number != value:
        raise RewardError(
            f"reward {fn!r}: {key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer"
        )
    return number
