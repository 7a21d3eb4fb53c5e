"""Verifiable tasks: the ``Example`` row, the ``Task`` base class and the task registry.

A task generates prompts whose right answer can be checked by a program, so the same
task serves pretraining (prompt + answer as text), SFT (answer as the target), RL
(``is_correct`` as the reward) and evaluation (held-out accuracy).

How a task draws examples (the base class does it; subclasses only describe problems):

- A *problem* is a canonical string such as ``"12+34"`` (its ``key``). Which split a
  problem belongs to is decided by a stable hash of that key (blake2b, not Python's
  salted ``hash``), so it does not depend on ``n``, ``seed``, the order of generation or
  the Python process: the same problem is never in both ``train`` and ``heldout``.
  Because the key does not include the task's size parameters, a problem that is
  held out at ``digits=2`` is also held out at ``digits=3``.
- Small problem spaces (at most ``ENUMERATE_LIMIT`` problems) are enumerated, split,
  and shuffled with a seeded RNG; ``examples(split, n, seed)`` is a prefix of that
  shuffled list. When ``n`` exceeds the number of distinct problems in the split,
  ``train`` repeats the problems (each further pass reshuffled, so every problem
  appears once before any appears twice: sampling with replacement that still covers
  the split), while ``heldout`` returns each distinct problem once and warns that it
  returned fewer than ``n``.
- Large spaces are sampled problem by problem with the seeded RNG, keeping only
  problems of the requested split, without duplicates.

Everything is deterministic in ``(task params, split, n, seed)``: the RNG is seeded from
a string of those, never from global state.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import random
import string
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ccrl.errors import DataError

SPLITS = ("train", "heldout")
ENUMERATE_LIMIT = 200_000
"""problem spaces up to this size are enumerated exactly; larger ones are sampled"""
DEFAULT_HELDOUT_FRACTION = 0.1

_PUNCTUATION = " .,:;?!+-*=()'"


def alphabet() -> str:
    """Every character a built-in task can emit, sorted: one tokenizer serves them all.

    Lowercase and uppercase letters, digits, space and ``.,:;?!+-*=()'`` (uppercase
    letters because a constitution's refusal sentence is ordinary prose).
    """
    return "".join(sorted(set(string.ascii_letters + string.digits + _PUNCTUATION)))


@dataclass(frozen=True)
class Example:
    """One row of a task or of a user dataset."""

    prompt: str
    """the text the model is conditioned on, e.g. ``"12+34="``"""
    answer: str | None
    """the reference answer, e.g. ``"46"``; None for text-only (pretraining) rows"""
    extra: dict = field(default_factory=dict)
    """further columns, passed to reward functions as keyword arguments"""
    messages: list | None = None
    """a conversational row's prompt as TRL messages ``[{role, content}, ...]`` (``prompt`` is then
    its chat-template rendering); reward functions receive it as the prompt. None for plain text"""
    conversation: list | None = None
    """an SFT row's whole conversation (the ``messages`` column), trained on its assistant turns"""


def split_of(key: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """The split of a problem with canonical string ``key``: a stable hash, not random.

    >>> split_of("12+34") == split_of("12+34")
    True
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 1_000_000
    return "heldout" if bucket < heldout_fraction * 1_000_000 else "train"


class Task:
    """Base class of the verifiable tasks; subclasses are registered with ``register_task``.

    A subclass takes its parameters as keyword arguments of ``__init__`` (validated
    there, raising ``DataError`` that names the parameter), stores them canonically in
    ``self.params``, and describes its problems with ``key``, ``make_example``,
    ``space_size``, ``enumerate_problems`` and ``sample_problem``.
    """

    name: str = "task"
    params: dict[str, Any]
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    # ---- what a subclass describes ----------------------------------------------
    def key(self, problem: Any) -> str:
        """The canonical string of a problem; it alone decides the problem's split."""
        raise NotImplementedError

    def make_example(self, problem: Any) -> Example:
        raise NotImplementedError

    def space_size(self) -> int:
        """How many distinct problems the current parameters allow."""
        raise NotImplementedError

    def enumerate_problems(self) -> Iterator[Any]:
        """Every problem, in a fixed order (called only when ``space_size`` is small)."""
        raise NotImplementedError

    def sample_problem(self, rng: random.Random) -> Any:
        """One problem drawn uniformly from the whole space."""
        raise NotImplementedError

    # ---- the public interface ----------------------------------------------------
    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` ("train" or "heldout"), deterministic in (params, split, n, seed).

        ``train`` always returns ``n`` examples, repeating problems when the split has
        fewer than ``n``; ``heldout`` never repeats and returns fewer than ``n`` (with a
        warning) when the split has fewer distinct problems.
        """
        _check_split(split)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"task {self.name!r}: n must be a non-negative int, got {n!r}")
        rng = self._rng(split, seed)
        if self.space_size() <= ENUMERATE_LIMIT:
            problems = draw_from_pool(self._split_pool(split), split, n, rng, f"task {self.name!r}")
        else:
            problems = self._sample_split(split, n, rng)
        return [self.make_example(p) for p in problems]

    def is_correct(self, completion: str, example: Example) -> bool:
        """Whether a completion (generated text without the prompt, EOS stripped) is right.

        Surrounding whitespace is ignored; runs of inner whitespace count as one space.
        """
        target = self.format_target(example)
        return _normalise(completion) == _normalise(target)

    def format_target(self, example: Example) -> str:
        """The completion the model must produce (without EOS: callers append it)."""
        if example.answer is None:
            raise DataError(f"task {self.name!r}: example {example.prompt!r} has no answer")
        return example.answer

    def corpus(self) -> list[str]:
        """Strings covering the task's whole alphabet, for training a tokenizer.

        Prompt + target of a fixed sample of training examples, plus one string with
        every character of ``alphabet()``.
        """
        sample = self.examples("train", 2000, seed=0)
        return [alphabet()] + [ex.prompt + self.format_target(ex) for ex in sample]

    def num_problems(self, split: str) -> int | None:
        """Distinct problems in ``split``, or None when the space is too large to count."""
        _check_split(split)
        if self.space_size() > ENUMERATE_LIMIT:
            return None
        return len(self._split_pool(split))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"get_task({self.name!r}{', ' if args else ''}{args})"

    # ---- machinery -----------------------------------------------------------------
    def _rng(self, split: str, seed: int) -> random.Random:
        # random.Random(str) seeds through sha512: stable across processes and platforms
        params = json.dumps(self.params, sort_keys=True, default=str)
        return random.Random(f"{self.name}|{params}|{split}|{seed}")

    def _split_pool(self, split: str) -> list[Any]:
        cache = self.__dict__.setdefault("_pool_cache", {})
        if split not in cache:
            pools: dict[str, list[Any]] = {"train": [], "heldout": []}
            for problem in self.enumerate_problems():
                pools[split_of(self.key(problem), self.heldout_fraction)].append(problem)
            cache.update(pools)
        return cache[split]

    def _sample_split(self, split: str, n: int, rng: random.Random) -> list[Any]:
        out: list[Any] = []
        seen: set[str] = set()
        tries = 0
        max_tries = 200 * n + 10_000
        while len(out) < n and tries < max_tries:
            tries += 1
            problem = self.sample_problem(rng)
            key = self.key(problem)
            if key in seen or split_of(key, self.heldout_fraction) != split:
                continue
            seen.add(key)
            out.append(problem)
        if len(out) < n:
            if split == "heldout" or not out:
                _warn_short(f"task {self.name!r}", split, len(out), n)
            else:  # train: repeat what was found rather than fail
                out += [out[i % len(out)] for i in range(n - len(out))]
        return out


def draw_from_pool(pool: list[Any], split: str, n: int, rng: random.Random, label: str) -> list[Any]:
    """``n`` problems from the fixed list ``pool`` of one split (see the module docstring).

    ``label`` names the pool in messages, e.g. ``"task 'arithmetic'"``.
    """
    if n == 0:
        return []
    if not pool:
        raise DataError(
            f"{label} has no {split} problems with these parameters; "
            "widen them (more digits, longer strings, more words)"
        )
    order = list(pool)
    rng.shuffle(order)
    if n <= len(order):
        return order[:n]
    if split == "heldout":
        _warn_short(label, split, len(order), n)
        return order
    out = list(order)
    while len(out) < n:  # train: reshuffled passes over the whole split
        rng.shuffle(order)
        out += order[: n - len(out)]
    return out


def _warn_short(label: str, split: str, got: int, wanted: int) -> None:
    warnings.warn(
        f"{label} has only {got} distinct {split} problems with these parameters; "
        f"returning {got} examples instead of {wanted}",
        stacklevel=3,
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def _normalise(text: str) -> str:
    return " ".join(text.split())


# ---- the registry ----------------------------------------------------------------------
_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a ``Task`` subclass under ``name``."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_tasks() -> list[str]:
    """The names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **params: Any) -> Task:
    """The task ``name`` built with ``params``; unknown names and parameters are ``DataError``."""
    if name not in _REGISTRY:
        raise DataError(f"unknown task {name!r}{_did_you_mean(name, _REGISTRY)}; known tasks: {list_tasks()}")
    cls = _REGISTRY[name]
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for param in params:
        if param not in accepted:
            raise DataError(
                f"task {name!r} has no parameter {param!r}{_did_you_mean(param, accepted)}; "
                f"its parameters are {accepted}"
            )
    return cls(**params)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_heldout_fraction(task_name: str, value: Any) -> float:
    """Validate the ``heldout_fraction`` parameter every built-in task accepts."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DataError(
            f"task {task_name!r}: parameter 'heldout_fraction' must be a number strictly between 0 and 1, "
            f"got {value!r}"
        )
    return float(value)


def check_int(task_name: str, param: str, value: Any, lo: int, hi: int) -> int:
    """Validate an integer parameter in ``[lo, hi]``, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DataError(
            f"task {task_name!r}: parameter {param!r} must be an int from {lo} to {hi}, got {value!r}"
        )
    return value


def check_bool(task_name: str, param: str, value: Any) -> bool:
    """Validate a true/false parameter, naming it in the error."""
    if not isinstance(value, bool):
        raise DataError(f"task {task_name!r}: parameter {param!r} must be true or false, got {value!r}")
    return value


def check_range(task_name: str, param: str, value: Any, lo: int, hi: int) -> tuple[int, int]:
    """Validate a length parameter given as an int or a ``[min, max]`` pair within ``[lo, hi]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and lo <= value[0] <= value[1] <= hi
    )
    if not ok:
        raise DataError(
            f"task {task_name!r}: parameter {param!r} must be an int or a [min, max] pair "
            f"with {lo} <= min <= max <= {hi}, got {value!r}"
        )
    return (value[0], value[1])
