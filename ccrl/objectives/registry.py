"""Objective registry: the names recipes use → loss function + default hyper-parameters.

A trainer looks an objective up instead of branching on its name; ``hparams`` is the one place
where a recipe's settings are merged with the objective's defaults:

    spec = get_objective("dapo")
    kwargs = spec.loss_kwargs(kl_beta=0.01)           # defaults + recipe overrides, checked
    loss, metrics = spec.loss_fn(logprobs, old_logprobs, advantages, mask, **kwargs)
    # a ``council`` objective (ccrl) also takes the overseer's α after ``mask``
    adv = group_advantages(rewards, G, scale=spec.hparams()["scale"], clip=...)

Online objectives share one set of hyper-parameters:

    eps_low, eps_high           ratio clip range, clip(ρ, 1−eps_low, 1+eps_high)
    aggregation                 "sequence" | "token" | "constant" (see ``aggregate``)
    scale                       advantage scaling "group" | "batch" | "none"
    advantage_clip              None or (lo, hi), clamp on A after scaling
    kl_beta                     β_KL of the k3 penalty to the reference policy
    importance_sampling_level   "token" | "sequence" (GSPO)
    council_beta                β of the council entropy bonus (only ``ccrl`` uses it)
    dynamic_sampling            DAPO: drop groups whose rewards are all equal, resample
    overlong_shaping            DAPO: add the ``overlong`` reward (Eq. 13) to the task reward

Preference objectives: ``beta`` and, for dpo/ipo, ``loss_type`` and ``nll_weight`` (RPO's NLL term).

| name    | loss_fn     | clip ε      | aggregation | scale | level    | other                      |
|---------|-------------|-------------|-------------|-------|----------|----------------------------|
| grpo    | policy_loss | 0.2 / 0.2   | sequence    | group | token    | arXiv 2402.03300           |
| dapo    | policy_loss | 0.2 / 0.28  | token       | group | token    | dynamic sampling, overlong |
| dr_grpo | policy_loss | 0.2 / 0.2   | constant    | none  | token    | arXiv 2503.20783           |
| gspo    | policy_loss | 3e-4 / 4e-4 | sequence    | group | sequence | arXiv 2507.18071           |
| ccrl    | ccrl_loss   | 0.2 / 0.28  | token       | batch | token    | DAPO's + council_beta 0.05 |
| dpo     | dpo_loss    |             |             |       |          | beta 0.1, sigmoid          |
| ipo     | dpo_loss    |             |             |       |          | beta 0.1, ipo              |
| orpo    | orpo_loss   |             |             |       |          | beta 0.1                   |

All online objectives default to kl_beta 0 (TRL ≥ 0.19 and DAPO drop the KL term).

CCRL scales advantages by the batch std, not the group std (``scale_rewards: group`` gives
DESIGN.md's group-relative default back): V_Ω adds small-weight terms (w_C·VIR, −w_E·ICE) to the
task reward, and in a group whose task rewards are all equal the group std is that of the small
terms alone, so dividing by it would give their differences the weight of a right answer. With
the batch std the terms keep the weights the recipe gives them; the advantage is still centred
on each group's mean. docs/objectives-notes.md has the measurements behind this choice.
GSPO's ε are TRL's paper-index values; its ratio is the length-normalised sequence ratio.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ccrl.errors import RecipeError
from ccrl.objectives.advantages import SCALES
from ccrl.objectives.council import ccrl_loss
from ccrl.objectives.policy import AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, policy_loss
from ccrl.objectives.preference import DPO_LOSS_TYPES, dpo_loss, orpo_loss

KINDS = ("online", "preference")
_ALIASES = {"epsilon": "eps_low", "epsilon_high": "eps_high", "advantage_scale": "scale", "scale_rewards": "scale"}
"""recipe spellings (TRL's ``epsilon``/``epsilon_high``/``scale_rewards``) accepted by ``hparams``/``loss_kwargs``"""
_ONLINE_LOSS_KEYS = ("eps_low", "eps_high", "aggregation", "kl_beta", "importance_sampling_level")


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective."""

    name: str
    """the recipe name, e.g. ``"dapo"``"""
    kind: str
    """"online" (rollouts, advantages, clipped surrogate) or "preference" (pairs)"""
    loss_fn: Callable[..., Any]
    """the pure loss function, returning ``(loss, metrics)``"""
    defaults: dict[str, Any] = field(default_factory=dict)
    """hyper-parameters and their defaults (``get_objective`` hands out a fresh copy each time)"""
    reference: str = ""
    """the paper (and equation) the defaults follow"""
    council: bool = False
    """``loss_fn`` takes the overseer's dense α (``council_alpha``, (B, T, P)) after ``mask`` and
    ``council_beta`` as its ``beta``: the council entropy bonus of CCRL"""

    def hparams(self, **overrides: Any) -> dict[str, Any]:
        """Defaults updated with ``overrides`` (None values are ignored), validated.

        Raises :class:`HyperParameterError` (a RecipeError whose ``key`` is the key as the caller
        spelled it) for unknown keys (with a did-you-mean), bad values, and a ``council_beta`` other
        than 0 for an objective without the council term.
        """
        out = dict(self.defaults)
        spelled: dict[str, str] = {}
        for given, value in overrides.items():
            key = _ALIASES.get(given, given)
            if key not in out:
                raise HyperParameterError(
                    given,
                    f"objective {self.name!r}: unknown hyper-parameter {given!r}{_did_you_mean(key, out)}; "
                    f"known: {sorted(out)}",
                )
            if value is not None:
                out[key] = tuple(value) if key == "advantage_clip" else value
                spelled[key] = given
        _validate(self.name, out, spelled)
        if "council_beta" in out and not self.council and out["council_beta"] != 0:
            key = spelled.get("council_beta", "council_beta")
            raise HyperParameterError(
                key,
                f"objective {self.name!r} takes no {key} (got {out['council_beta']}): only the ccrl objective "
                "takes it, for its council entropy bonus; remove the key or use objective: ccrl",
            )
        return out

    def loss_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of ``loss_fn`` for these hyper-parameters (checked as ``hparams``)."""
        hp = self.hparams(**overrides)
        if self.kind == "preference":
            return {k: hp[k] for k in ("beta", "loss_type", "nll_weight") if k in hp}
        kwargs = {k: hp[k] for k in _ONLINE_LOSS_KEYS}
        if self.council:
            kwargs["beta"] = hp["council_beta"]
        return kwargs


class HyperParameterError(RecipeError):
    """A bad objective hyper-parameter; ``key`` is its name as the caller spelled it (the recipe's key)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _validate(name: str, hp: dict[str, Any], spelled: dict[str, str]) -> None:
    def bad(key: str, expected: str) -> RecipeError:
        given = spelled.get(key, key)
        return HyperParameterError(given, f"objective {name!r}: {given}={hp[key]!r} is invalid; expected {expected}")

    choices = {
        "aggregation": AGGREGATIONS,
        "scale": SCALES,
        "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
        "loss_type": DPO_LOSS_TYPES,
    }
    for key, allowed in choices.items():
        if key in hp and hp[key] not in allowed:
            raise bad(key, f"one of {list(allowed)}")
    for key in ("eps_low", "eps_high", "kl_beta", "council_beta", "nll_weight"):
        if key in hp and (not isinstance(hp[key], int | float) or hp[key] < 0):
            raise bad(key, "a number >= 0")
    if "eps_low" in hp and hp["eps_low"] >= 1:
        raise bad("eps_low", "a number in [0, 1)")
    if "beta" in hp and (not isinstance(hp["beta"], int | float) or hp["beta"] <= 0):
        raise bad("beta", "a number > 0")
    clip = hp.get("advantage_clip")
    if clip is not None and (len(clip) != 2 or clip[0] > clip[1]):
        raise bad("advantage_clip", "null or [lo, hi] with lo <= hi")


def _online(eps_low, eps_high, aggregation, scale, level="token", council_beta=0.0, dapo=False) -> dict:
    return {
        "eps_low": eps_low,
        "eps_high": eps_high,
        "aggregation": aggregation,
        "scale": scale,
        "advantage_clip": None,
        "kl_beta": 0.0,
        "importance_sampling_level": level,
        "council_beta": council_beta,
        "dynamic_sampling": dapo,
        "overlong_shaping": dapo,
    }


_REGISTRY: dict[str, ObjectiveSpec] = {}


def _register(name: str, kind: str, loss_fn: Callable[..., Any], defaults: dict, reference: str,
              council: bool = False) -> None:
    _REGISTRY[name] = ObjectiveSpec(name, kind, loss_fn, MappingProxyType(dict(defaults)), reference,  # type: ignore[arg-type]
                                    council)


_register(
    "grpo", "online", policy_loss, _online(0.2, 0.2, "sequence", "group"), "GRPO, arXiv 2402.03300, Eq. 3"
)
_register(
    "dapo",
    "online",
    policy_loss,
    _online(0.2, 0.28, "token", "group", dapo=True),
    "DAPO, arXiv 2503.14476, Eq. 8",
)
_register(
    "dr_grpo", "online", policy_loss, _online(0.2, 0.2, "constant", "none"), "Dr. GRPO, arXiv 2503.20783"
)
_register(
    "gspo",
    "online",
    policy_loss,
    _online(3e-4, 4e-4, "sequence", "group", "sequence"),
    "GSPO, arXiv 2507.18071",
)
_register(
    "ccrl",
    "online",
    ccrl_loss,
    _online(0.2, 0.28, "token", "batch", council_beta=0.05, dapo=True),
    "DESIGN.md",
    council=True,
)
_register(
    "dpo", "preference", dpo_loss, {"beta": 0.1, "loss_type": "sigmoid", "nll_weight": 0.0},
    "DPO, arXiv 2305.18290, Eq. 7"
)
_register("ipo", "preference", dpo_loss, {"beta": 0.1, "loss_type": "ipo", "nll_weight": 0.0},
          "IPO, arXiv 2310.12036, Eq. 17")
_register("orpo", "preference", orpo_loss, {"beta": 0.1}, "ORPO, arXiv 2403.07691, Eq. 6-7")


def get_objective(name: str) -> ObjectiveSpec:
    """The :class:`ObjectiveSpec` of a recipe's objective name.

    Raises RecipeError (with a did-you-mean) for an unknown name.
    """
    try:
        spec = _REGISTRY[name]
    except (KeyError, TypeError):
        raise RecipeError(
            f"unknown objective {name!r}{_did_you_mean(str(name), _REGISTRY)}; known: {list_objectives()}"
        ) from None
    return replace(spec, defaults=dict(spec.defaults))  # a copy: callers may edit it freely


def list_objectives(kind: str | None = None) -> list[str]:
    """Registered objective names (optionally of one kind), sorted."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)
