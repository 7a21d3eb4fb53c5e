"""``arithmetic``: "12+34=" -> "46", with +, - and * on non-negative integer operands.

Parameters: ``ops`` (a subset of "+-*", as a string or a list; default "+-"), ``digits``
(the most digits of an operand, 1-9; default 2), ``min_value`` (the smallest operand;
default 0), ``heldout_fraction`` (default 0.1), and two formats:

- ``pad`` (default false): operands are written zero-padded to ``digits`` digits
  ("05+34=" -> "39"), so every digit of an operand sits at a fixed distance from "=".
- ``reverse`` (default false): the answer's digits are written least significant first,
  the sign staying in front ("12+39=" -> "15", "3-25=" -> "-22", "70+50=" -> "021"). The
  units digit then comes first, and every carry comes after the digit that causes it
  (Lee et al. 2023, "Teaching Arithmetic to Small Transformers", found this order much
  easier to learn). A reversed answer is checked as a string: "021" is not "21".

Operands are uniform over ``[min_value, 10**digits - 1]``, so problems are uniform over
the space. Subtraction may go negative ("3-25=" -> "-22"). Answers are computed with
integer operations, never eval. Formats change only the text: a problem's key, and so
its split, is the same in every format.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator

from ccrl.data.tasks import (
    DEFAULT_HELDOUT_FRACTION,
    Example,
    Task,
    check_bool,
    check_heldout_fraction,
    check_int,
    register_task,
)
from ccrl.errors import DataError

OPS = "+-*"
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INTEGER = re.compile(r"[+-]?\d+")

Problem = tuple[int, str, int]


@register_task("arithmetic")
class Arithmetic(Task):
    def __init__(
        self,
        ops: str | list[str] = "+-",
        digits: int = 2,
        min_value: int = 0,
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        pad: bool = False,
        reverse: bool = False,
    ):
        self.ops = _check_ops(ops)
        self.digits = check_int(self.name, "digits", digits, 1, 9)
        self.max_value = 10**self.digits - 1
        self.min_value = check_int(self.name, "min_value", min_value, 0, self.max_value)
        self.heldout_fraction = check_heldout_fraction(self.name, heldout_fraction)
        self.pad = check_bool(self.name, "pad", pad)
        self.reverse = check_bool(self.name, "reverse", reverse)
        self.params = {
            "ops": self.ops,
            "digits": self.digits,
            "min_value": self.min_value,
            "heldout_fraction": self.heldout_fraction,
            "pad": self.pad,
            "reverse": self.reverse,
        }

    def key(self, problem: Problem) -> str:
        a, op, b = problem
        return f"{a}{op}{b}"

    def make_example(self, problem: Problem) -> Example:
        a, op, b = problem
        width = self.digits if self.pad else 0
        answer = str(_APPLY[op](a, b))
        if self.reverse:
            sign, digits = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
            answer = sign + digits[::-1]
        return Example(prompt=f"{a:0{width}d}{op}{b:0{width}d}=", answer=answer)

    def space_size(self) -> int:
        width = self.max_value - self.min_value + 1
        return len(self.ops) * width * width

    def enumerate_problems(self) -> Iterator[Problem]:
        values = range(self.min_value, self.max_value + 1)
        for op, a, b in itertools.product(self.ops, values, values):
            yield (a, op, b)

    def sample_problem(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        return (rng.randint(self.min_value, self.max_value), op, rng.randint(self.min_value, self.max_value))

    def is_correct(self, completion: str, example: Example) -> bool:
        """Numeric comparison of the whole completion (whitespace around it ignored).

        A reversed answer is compared as a string ("021" is not "21").
        """
        if self.reverse:
            return super().is_correct(completion, example)
        text = completion.strip()
        target = self.format_target(example).strip()
        if _INTEGER.fullmatch(text) and _INTEGER.fullmatch(target):
            return int(text) == int(target)
        return text == target


def _check_ops(ops) -> str:
    chars = list(ops) if isinstance(ops, (str, list, tuple)) else None
    if not chars or not all(isinstance(c, str) and c in OPS for c in chars):
        raise DataError(
            f"task 'arithmetic': parameter 'ops' must be a non-empty subset of {OPS!r}, got {ops!r}"
        )
    return "".join(c for c in OPS if c in chars)  # canonical order, duplicates dropped
