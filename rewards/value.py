"""V_Ω, the council value: the task reward plus values integrity minus compute cost."""

from __future__ import annotations

from typing import Any

from rewards.errors import RewardError
from rewards.registry import bind, call_reward, register

VALUE_KEY = "value"
"""the key of V_Ω in :meth:`CouncilValue.terms` (and in run summaries)"""


class CouncilValue:
    """V_Ω(s, a) = w_R·R(s, a) + w_C·C_VIR(s, a) − w_E·E_ICE(s, a) (DESIGN.md, "The formulas").

    A reward function (TRL signature) returning V_Ω per sample. ``task`` is the reward R:
    a registered name, a ``"package.module:function"`` path or a callable; ``task_params``
    are bound to it (e.g. ``{"pattern": ...}`` for ``format``). ``constitution`` is passed
    to ``vir``. A term whose weight is 0 is not computed. A term that returns None for a
    sample is skipped there (as the trainer's nansum does); V_Ω is None only if every
    term is None.

    >>> v = CouncilValue(w_R=1.0, w_C=0.5, w_E=0.25)
    >>> v(["what is 2+2?"], ["4"], answer=["4"], completion_lengths=[2], max_completion_length=4)
    [1.375]
    >>> v.terms(["what is 2+2?"], ["5"], answer=["4"], completion_lengths=[2], max_completion_length=4)
    {'exact_match': [0.0], 'vir': [1.0], 'ice': [0.5], 'value': [0.375]}
    """

    def __init__(
        self,
        w_R: float = 1.0,
        w_C: float = 0.1,
        w_E: float = 0.05,
        task: Any = "exact_match",
        constitution: Any = None,
        task_params: dict | None = None,
    ):
        for key, w in (("w_R", w_R), ("w_C", w_C), ("w_E", w_E)):
            if not isinstance(w, int | float) or w != w:
                raise RewardError(f"CouncilValue: {key}={w!r} must be a number")
        self.w_R, self.w_C, self.w_E = float(w_R), float(w_C), float(w_E)
        self.task = bind(task, **(task_params or {}))
        self.task_name = self.task.__name__
        vir_params = {} if constitution is None else {"constitution": constitution}
        self._terms = [
            (self.task_name, self.task, self.w_R),
            ("vir", bind("vir", **vir_params), self.w_C),
            ("ice", bind("ice"), -self.w_E),
        ]
        self.__name__ = "council_value"

    def terms(self, prompts: list, completions: list, **kwargs: Any) -> dict[str, list[float | None]]:
        """Each term per sample (None where not computed or no opinion) and V_Ω under ``"value"``."""
        out: dict[str, list[float | None]] = {}
        n = len(completions)
        for name, fn, weight in self._terms:
            out[name] = call_reward(fn, name, prompts, completions, **kwargs) if weight else [None] * n
        values: list[float | None] = []
        for i in range(n):
            parts = [w * out[name][i] for name, _, w in self._terms if w and out[name][i] is not None]
            values.append(sum(parts) if parts else None)
        out[VALUE_KEY] = values
        return out

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        return self.terms(prompts, completions, **kwargs)[VALUE_KEY]

    def __repr__(self) -> str:
        return f"CouncilValue(w_R={self.w_R}, w_C={self.w_C}, w_E={self.w_E}, task={self.task_name!r})"


@register("council_value")
def council_value(
    prompts: list,
    completions: list,
    *,
    w_R: float = 1.0,
    w_C: float = 0.1,
    w_E: float = 0.05,
    task: Any = "exact_match",
    task_params: dict | None = None,
    constitution: Any = None,
    **kwargs: Any,
) -> list[float | None]:
    """V_Ω as one registered reward, so a recipe can write ``{name: council_value, w_C: 0.2}``.

        V_Ω = w_R·R + w_C·C_VIR − w_E·E_ICE     (see :class:`CouncilValue`)

    kwargs read: everything its terms read (``answer``, ``completion_lengths``,
    ``max_completion_length``, ``active_params_per_token``, ``total_params``, ...).

    >>> council_value(["2+2="], ["4"], w_E=0.0, answer=["4"])
    [1.1]
    """
    cv = CouncilValue(w_R, w_C, w_E, task=task, constitution=constitution, task_params=task_params)
    return cv(prompts, completions, **kwargs)
