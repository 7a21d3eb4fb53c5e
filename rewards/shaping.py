"""Length shaping: DAPO's soft overlong punishment."""

from __future__ import annotations

from typing import Any

from rewards._common import lengths, positive_int
from rewards.errors import RewardError
from rewards.registry import register

DEFAULT_CACHE_FRACTION = 0.2
"""L_cache / L_max when ``overlong_cache`` is not given: DAPO's 4096 / 20480"""


@register("overlong")
def overlong(
    prompts: list,
    completions: list,
    *,
    max_completion_length: int | None = None,
    overlong_cache: int | None = None,
    completion_lengths: Any = None,
    completion_ids: Any = None,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, Eq. 13), in [−1, 0].

        R_len(y) = 0                               if |y| ≤ L_max − L_cache
                 = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
                 = −1                              if |y| > L_max

    |y| is the number of generated tokens. kwargs read: ``max_completion_length`` (L_max),
    ``overlong_cache`` (L_cache; a recipe param; default round(0.2·L_max), DAPO's
    4096/20480; 0 disables the soft zone), ``completion_lengths`` or ``completion_ids``.
    Identical to TRL's ``get_soft_overlong_punishment(L_max, L_cache)``.

    >>> overlong(["q"] * 3, ["", "", ""], completion_lengths=[70, 90, 120],
    ...          max_completion_length=100, overlong_cache=20)
    [0.0, -0.5, -1.0]
    """
    l_max = positive_int(max_completion_length, "max_completion_length", "overlong")
    if overlong_cache is None:
        l_cache = max(1, round(DEFAULT_CACHE_FRACTION * l_max))
    else:
        l_cache = positive_int(overlong_cache, "overlong_cache", "overlong", allow_zero=True)
    if l_cache > l_max:
        raise RewardError(
            f"reward 'overlong': overlong_cache={l_cache} exceeds max_completion_length={l_max}"
        )
    out = []
    for n in lengths(len(completions), "overlong", completion_lengths, completion_ids):
        if n <= l_max - l_cache:
            out.append(0.0)
        elif n <= l_max:
            out.append(((l_max - l_cache) - n) / l_cache)
        else:
            out.append(-1.0)
    return out
