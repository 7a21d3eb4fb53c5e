"""Task rewards R(s, a): exact answer, partial credit, numeric answer, format (regex).

All three read the dataset column ``answer`` (one entry per completion, as TRL repeats a
row's columns for each of its G completions) where they need it; an ``answer`` of None
means the row has no reference, and the reward says "no opinion" (None) for it.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from rewards._common import column, text
from rewards.errors import RewardError
from rewards.registry import register

_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?"  # 12, -12.0, 1,000, 3e5
    r"|[-+]?\.\d+(?:[eE][-+]?\d+)?"  # .5
)


def parse_number(s: str) -> float | None:
    """The first number in ``s`` (sign, decimals, exponent and 1,000-style separators allowed), or None.

    >>> parse_number("  -12.0 apples")
    -12.0
    >>> parse_number("costs 1,250.5 dollars"), parse_number("no digits")
    (1250.5, None)
    """
    match = _NUMBER.search(s)
    return float(match.group(0).replace(",", "")) if match else None


def _reply(completion: Any, fn: str, index: int) -> str:
    """A completion's text: the string, or for a conversational completion (TRL's
    ``[{"role": "assistant", "content": ...}]``) the content of its assistant messages."""
    if isinstance(completion, list | tuple) and all(isinstance(m, dict) for m in completion):
        replies = [m for m in completion if m.get("role") == "assistant"]
        completion = replies or completion
    return text(completion, "completions", fn, index)


@register("exact_match")
def exact_match(
    prompts: list,
    completions: list,
    *,
    answer: Any = None,
    ignore_case: bool = False,
    strip: bool = True,
    match: str = "text",
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the completion equals the reference ``answer`` after stripping whitespace, else 0.0.

        R = 1[strip(completion) == strip(answer)]      (case-folded if ``ignore_case``)

    With ``strip=False`` the texts are compared as they are, character for character: "59 " and
    " 59" then score 0.0 against "59" (a recipe writes ``{name: exact_match, strip: false}``).

    With ``match="tokens"`` the generated token ids are compared, and the answer must end the
    completion:

        R = 1[completion_ids == answer_ids + [eos_token_id]]

    where ``answer_ids`` is the answer tokenized with the policy's tokenizer (no special tokens)
    and ``completion_ids`` the generated ids, EOS included when it was generated (ccrl passes all
    three). "59 ", " 59", "590", a completion that goes on after "59", and one cut off at
    ``max_new_tokens`` before its EOS all score 0.0; so does "59" spelled with other tokens than
    the tokenizer gives the answer. ``strip`` and ``ignore_case`` apply to text only.

    kwargs read: ``answer`` (dataset column; None entries give None); with ``match="tokens"``
    also ``completion_ids``, ``answer_ids`` and ``eos_token_id``. Params: ``ignore_case``,
    ``strip`` (default True), ``match`` (``text``, the default, or ``tokens``).

    >>> exact_match(["2+2=", "3+3="], [" 4 ", "7"], answer=["4", "6"])
    [1.0, 0.0]
    >>> exact_match(["q", "q", "q"], ["59 ", " 59", "59"], answer=["59"] * 3, strip=False)
    [0.0, 0.0, 1.0]
    >>> exact_match([[{"role": "user", "content": "2+2?"}]], [[{"role": "assistant", "content": "4"}]], answer=["4"])
    [1.0]
    >>> exact_match(["q", "q", "q"], ["59", "59", "590"], answer=["59"] * 3, match="tokens",
    ...             completion_ids=[[5, 9, 2], [5, 9], [5, 9, 0, 2]], answer_ids=[[5, 9]] * 3, eos_token_id=2)
    [1.0, 0.0, 0.0]
    """
    if not isinstance(strip, bool):
        raise RewardError(f"reward 'exact_match': strip={strip!r}; expected true or false")
    if match not in ("text", "tokens"):
        raise RewardError(f"reward 'exact_match': match={match!r}; expected 'text' or 'tokens'")
    answers = column(answer, len(completions), "answer", "exact_match", "the dataset column with references")
    if match == "tokens":
        return _token_match(completions, answers, ignore_case, kwargs)
    out: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, answers)):
        if ref is None:
            out.append(None)
            continue
        got, want = _reply(completion, "exact_match", i), str(ref)
        if strip:
            got, want = got.strip(), want.strip()
        if ignore_case:
            got, want = got.casefold(), want.casefold()
        out.append(float(got == want))
    return out


def _token_match(completions: list, answers: list, ignore_case: bool, kwargs: dict) -> list[float | None]:
    """``exact_match`` with ``match="tokens"``: 1[completion_ids == answer_ids + [eos_token_id]]."""
    if ignore_case:
        raise RewardError("reward 'exact_match': ignore_case applies to match: text only, not match: tokens")
    n = len(completions)
    need = "(passed by ccrl's trainers; match: tokens compares token ids)"
    ids = column(kwargs.get("completion_ids"), n, "completion_ids", "exact_match", need)
    refs = column(kwargs.get("answer_ids"), n, "answer_ids", "exact_match", need)
    eos = kwargs.get("eos_token_id")
    if eos is None:
        raise RewardError(f"reward 'exact_match' needs the keyword argument 'eos_token_id' {need}")
    out: list[float | None] = []
    for got, want, ref in zip(ids, refs, answers):
        if ref is None or want is None:
            out.append(None)
            continue
        got = got.tolist() if hasattr(got, "tolist") else got
        out.append(float([int(t) for t in got] == [*map(int, want), int(eos)]))
    return out


@register("partial_match")
def partial_match(
    prompts: list, completions: list, *, answer: Any = None, align: str = "right", **kwargs: Any
) -> list[float | None]:
    """Partial credit: the share of the reference's characters the completion has in place.

        R = (1 / max(|c|, |a|)) · Σ_i 1[c_i = a_i]       c, a = strip(completion), strip(answer)

    with the strings aligned at their ends (``align="right"``, the default: units digit under
    units digit, so "124" against "123" scores 2/3 and "23" against "123" also 2/3) or at their
    starts (``align="left"``). Two empty strings score 1.0. A dense companion to
    ``exact_match`` when whole answers are rarely right yet: a completion closer to the
    reference scores higher, and only the exact answer scores 1.0. kwargs read: ``answer``
    (None entries give None). Param: ``align``.

    >>> partial_match(["q", "q", "q", "q"], ["124", "23", "7", "99"], answer=["123", "123", "7", "123"])
    [0.6666666666666666, 0.6666666666666666, 1.0, 0.0]
    """
    if align not in ("right", "left"):
        raise RewardError(f"reward 'partial_match': align={align!r}; expected 'right' or 'left'")
    answers = column(answer, len(completions), "answer", "partial_match", "the dataset column with references")
    out: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, answers)):
        if ref is None:
            out.append(None)
            continue
        got, want = _reply(completion, "partial_match", i).strip(), str(ref).strip()
        n = max(len(got), len(want))
        if n == 0:
            out.append(1.0)
            continue
        if align == "right":
            got, want = got[::-1], want[::-1]
        out.append(sum(a == b for a, b in zip(got, want)) / n)
    return out


@register("numeric_match")
def numeric_match(
    prompts: list,
    completions: list,
    *,
    answer: Any = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the first number in the completion equals the reference number, else 0.0.

        R = 1[|x − y| ≤ max(rel_tol·max(|x|, |y|), abs_tol)],  x = first number of the completion

    Parsing is tolerant: leading text and whitespace, a sign, decimals, an exponent and
    "1,000" separators are accepted, so "  -12.0 apples" matches "-12". A completion with no
    number scores 0.0. kwargs read: ``answer`` (a number, or a string whose first number is
    the reference; None entries give None; a string with no number is an error).
    Params: ``rel_tol``, ``abs_tol``.

    >>> numeric_match(["q", "q", "q"], ["  -12.0 apples", "x = 3", "none"], answer=["-12", 4, "7"])
    [1.0, 0.0, 0.0]
    """
    answers = column(
        answer, len(completions), "answer", "numeric_match", "the dataset column with references"
    )
    out: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, answers)):
        if ref is None:
            out.append(None)
            continue
        want = float(ref) if isinstance(ref, int | float) else parse_number(str(ref))
        if want is None or not math.isfinite(want):
            raise RewardError(f"reward 'numeric_match': answer of sample {i} ({ref!r}) contains no number")
        got = parse_number(_reply(completion, "numeric_match", i))
        out.append(float(got is not None and math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol)))
    return out


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise RewardError(
            f"reward 'format': pattern {pattern!r} is not a valid regular expression: {e}"
        ) from None


@register("format")
def format_match(
    prompts: list,
    completions: list,
    *,
    pattern: str | None = None,
    mode: str = "fullmatch",
    strip: bool = False,
    **kwargs: Any,
) -> list[float]:
    """1.0 if the completion matches the regular expression ``pattern``, else 0.0.

        R = 1[re.fullmatch(pattern, completion, re.DOTALL)]      (mode="fullmatch", default)
        R = 1[re.search(pattern, completion, re.DOTALL)]         (mode="search")

    ``fullmatch`` demands the whole completion has the format (TRL's format rewards use
    ``re.match`` anchored at the start, which lets trailing junk through); ``search`` only
    asks that the pattern occurs somewhere. ``re.DOTALL`` lets ``.`` span lines. Params
    (recipe: ``{name: format, weight: 0.1, pattern: '...'}``): ``pattern`` (required),
    ``mode``, ``strip`` (strip whitespace first).

    >>> format_match(["q", "q"], ["<a>42</a>", "42"], pattern=r"<a>\\d+</a>")
    [1.0, 0.0]
    >>> format_match(["q"], ["the answer is 42."], pattern=r"\\d+", mode="search")
    [1.0]
    """
    if not isinstance(pattern, str):
        raise RewardError("reward 'format' needs the parameter 'pattern' (a regular expression string)")
    if mode not in ("fullmatch", "search"):
        raise RewardError(f"reward 'format': mode={mode!r}; expected 'fullmatch' or 'search'")
    regex = _compile(pattern)
    match = regex.fullmatch if mode == "fullmatch" else regex.search
    out = []
    for i, completion in enumerate(completions):
        s = _reply(completion, "format", i)
        out.append(float(match(s.strip() if strip else s) is not None))
    return out
