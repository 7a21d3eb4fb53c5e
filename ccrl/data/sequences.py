"""Sequence tasks: ``reverse`` ("rev abc=" -> "cba") and ``sort`` ("sort 3142=" -> "1234").

Parameters: ``length`` (an int or a ``[min, max]`` pair; default ``[3, 6]``),
``heldout_fraction`` (default 0.1), and for ``sort`` also ``chars`` ("digits" or
"letters"; default "digits"). ``reverse`` uses lowercase letters. Strings are drawn so
that every string of the allowed lengths is equally likely.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Iterator

from ccrl.data.tasks import (
    DEFAULT_HELDOUT_FRACTION,
    Example,
    Task,
    check_heldout_fraction,
    check_range,
    register_task,
)
from ccrl.errors import DataError

MAX_LENGTH = 32


class _StringTask(Task):
    """A task whose problem is one string over ``self.symbols`` of a length in ``self.length``."""

    symbols: str
    length: tuple[int, int]
    verb: str

    def key(self, problem: str) -> str:
        return f"{self.verb} {problem}"

    def space_size(self) -> int:
        lo, hi = self.length
        return sum(len(self.symbols) ** k for k in range(lo, hi + 1))

    def enumerate_problems(self) -> Iterator[str]:
        lo, hi = self.length
        for k in range(lo, hi + 1):
            for chars in itertools.product(self.symbols, repeat=k):
                yield "".join(chars)

    def sample_problem(self, rng: random.Random) -> str:
        lo, hi = self.length
        # pick the length in proportion to how many strings have it: uniform over strings
        weights = [len(self.symbols) ** k for k in range(lo, hi + 1)]
        k = rng.choices(range(lo, hi + 1), weights=weights)[0]
        return "".join(rng.choice(self.symbols) for _ in range(k))


@register_task("reverse")
class Reverse(_StringTask):
    verb = "rev"
    symbols = string.ascii_lowercase

    def __init__(self, length: int | list[int] = (3, 6), heldout_fraction: float = DEFAULT_HELDOUT_FRACTION):
        self.length = check_range(self.name, "length", length, 1, MAX_LENGTH)
        self.heldout_fraction = check_heldout_fraction(self.name, heldout_fraction)
        self.params = {"length": list(self.length), "heldout_fraction": self.heldout_fraction}

    def make_example(self, problem: str) -> Example:
        return Example(prompt=f"rev {problem}=", answer=problem[::-1])


@register_task("sort")
class Sort(_StringTask):
    verb = "sort"

    def __init__(
        self,
        length: int | list[int] = (3, 6),
        chars: str = "digits",
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    ):
        choices = {"digits": string.digits, "letters": string.ascii_lowercase}
        if chars not in choices:
            raise DataError(f"task 'sort': parameter 'chars' must be one of {sorted(choices)}, got {chars!r}")
        self.symbols = choices[chars]
        self.length = check_range(self.name, "length", length, 1, MAX_LENGTH)
        self.heldout_fraction = check_heldout_fraction(self.name, heldout_fraction)
        self.params = {"length": list(self.length), "chars": chars, "heldout_fraction": self.heldout_fraction}

    def make_example(self, problem: str) -> Example:
        return Example(prompt=f"sort {problem}=", answer="".join(sorted(problem)))
