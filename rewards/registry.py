"""The reward registry, dotted-path resolution, parameter binding and output validation.

A reward function has the TRL signature

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

and is called with keywords (``fn(prompts=..., completions=..., **kwargs)``, as TRL does),
so functions written for TRL that only take ``completions`` and ``**kwargs`` work too.
``None`` means "no opinion" for that sample; NaN/inf, non-numbers and a list of the wrong
length are errors (:func:`call_reward`).

Names a recipe may use: a registered name (``rewards.list_rewards()``), or
``"package.module:function"``, or ``"path/to/file.py:function"``.

A recipe is code. Resolving ``package.module:function`` imports the module and
``path/to/file.py:function`` executes the file, and this happens when the recipe is validated:
``ccrl check`` runs the top-level code of every module its rewards name, as ``ccrl run`` and
``ccrl compare`` do before anything trains. This is the same trust as TRL's reward functions
given by dotted path (its scripts import them) or transformers' ``trust_remote_code=True``: check
or run only recipes whose reward modules you would run yourself. Registered names and the
built-ins import nothing beyond this package.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewards.errors import InputError, RewardError, RewardSpecError, UnknownRewardError

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}


def register(
    name: str | RewardFn | None = None,
    *,
    cost: bool = False,
    override: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
):
    """Decorator registering a reward function under ``name`` (default: the function's ``__name__``).

        @rewards.register("my_reward")
        def my_reward(prompts, completions, **kwargs): ...

    ``cost=True`` marks a term that V_Ω subtracts (it sets ``fn.is_cost = True``; the
    trainer then uses −weight). Registering a *different* function under a taken name is
    an error unless ``override=True`` (re-registering the same function, e.g. after a
    module reload, is fine). ``check(params)`` (stored as ``fn.check_params``) validates the
    recipe parameters when :func:`bind` binds them, so ``ccrl check`` catches what the
    signature cannot (a model folder that does not exist); it raises RewardSpecError.
    """

    def decorate(fn: RewardFn) -> RewardFn:
        key = name if isinstance(name, str) else getattr(fn, "__name__", None)
        if not key:
            raise RewardError(f"register: cannot infer a name for {fn!r}; pass one, e.g. @register('name')")
        old = _REGISTRY.get(key)
        if old is not None and not override and _qualname(old) != _qualname(fn):
            raise RewardError(
                f"register: reward name {key!r} is already taken by {_qualname(old)}; "
                f"choose another name or pass override=True"
            )
        if cost:
            fn.is_cost = True
        if check is not None:
            fn.check_params = check
        fn.reward_name = key
        _REGISTRY[key] = fn
        return fn

    if callable(name):  # bare @register
        return decorate(name)
    return decorate


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(name: str) -> RewardFn:
    """The registered reward ``name``; UnknownRewardError (a RewardSpecError) with a did-you-mean otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownRewardError(
            f"unknown reward {name!r}{_did_you_mean(str(name), _REGISTRY)}; registered: {list_rewards()}; "
            "a recipe may also name 'package.module:function'"
        ) from None


def resolve(name_or_path: str | RewardFn) -> RewardFn:
    """A callable for a registered name, ``"package.module:function"``, ``"file.py:function"``, or a callable."""
    if callable(name_or_path):
        return name_or_path
    if not isinstance(name_or_path, str):
        raise UnknownRewardError(f"a reward must be a name or a callable, got {type(name_or_path).__name__}")
    if name_or_path in _REGISTRY or ":" not in name_or_path:
        return get(name_or_path)
    module_name, _, attr = name_or_path.rpartition(":")
    module = _import(module_name, name_or_path)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise UnknownRewardError(
                f"reward {name_or_path!r}: module {module_name!r} has no attribute {attr!r}"
                f"{_did_you_mean(attr, public)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UnknownRewardError(f"reward {name_or_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def _import(module_name: str, spec: str):
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UnknownRewardError(f"reward {spec!r}: file {module_name!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"_ccrl_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except InputError:
        raise
    except ImportError as e:
        raise UnknownRewardError(f"reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the user's module raised while importing
        raise UnknownRewardError(
            f"reward {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}"
        ) from e


def is_cost(fn: Any) -> bool:
    """True if ``fn`` (or the function a bound reward wraps) is a cost subtracted in V_Ω."""
    while fn is not None:
        if getattr(fn, "is_cost", False):
            return True
        fn = getattr(fn, "func", None)
    return False


class BoundReward(functools.partial):
    """A reward with recipe parameters bound. Bound parameters win over same-named kwargs."""

    def __call__(self, /, *args, **kwargs):
        return self.func(*self.args, *args, **{**kwargs, **self.keywords})


def bind(name_or_path: str | RewardFn, /, **params: Any) -> BoundReward:
    """Resolve a reward and bind recipe parameters (``{name: format, weight: 1, pattern: ...}``).

    The result is a :class:`functools.partial` subclass whose ``__name__`` is the reward's
    name (so logs read ``format``, not ``partial``) and which keeps ``is_cost``. Parameters
    a built-in does not take are a RewardSpecError (a misspelt ``patern`` would otherwise be
    swallowed by ``**kwargs``); a user function is checked only if it has no ``**kwargs``.
    A reward registered with ``check=`` has its parameters validated by it too.
    """
    fn = resolve(name_or_path)
    label = name_or_path if isinstance(name_or_path, str) else getattr(fn, "__name__", type(fn).__name__)
    label = getattr(fn, "reward_name", None) or label.rpartition(":")[2]
    _check_params(fn, label, params)
    if callable(getattr(fn, "check_params", None)):
        fn.check_params(dict(params))
    bound = BoundReward(fn, **params)
    bound.__name__ = label
    bound.__doc__ = getattr(fn, "__doc__", None)
    if is_cost(fn):
        bound.is_cost = True
    return bound


def _check_params(fn: RewardFn, label: str, params: dict[str, Any]) -> None:
    for reserved in ("prompts", "completions"):
        if reserved in params:
            raise RewardSpecError(f"reward {label!r}: {reserved!r} cannot be a parameter")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    named = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    strict = not has_var_kw or getattr(fn, "__module__", "").startswith("rewards.")
    for key in params:
        if strict and key not in named:
            options = [n for n in named if n not in ("prompts", "completions")]
            raise RewardSpecError(
                f"reward {label!r} has no parameter {key!r}{_did_you_mean(key, options)}; "
                f"its parameters: {options}"
            )


def call_reward(
    fn: RewardFn, name: str, prompts: list, completions: list, **kwargs: Any
) -> list[float | None]:
    """Call a reward function and validate its output.

    Returns one ``float`` or ``None`` per completion. Raises RewardError naming ``name``
    when the function raises (with the sample index if the exception carries an ``index``
    attribute), returns a non-sequence or the wrong number of values, or a value that is
    NaN/inf or not a number.
    """
    try:
        out = fn(prompts=prompts, completions=completions, **kwargs)
    except InputError as e:
        if name in str(e):
            raise
        raise type(e)(f"reward {name!r}: {e}") from e
    except Exception as e:
        idx = getattr(e, "index", None)
        where = f" on sample {idx}" if isinstance(idx, int) else ""
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}{where}: {e}") from e
    return validate_output(out, name, len(completions))


def validate_output(out: Any, name: str, n: int) -> list[float | None]:
    """Check a reward's return value: a sequence of n numbers or None, finite."""
    if hasattr(out, "tolist") and not isinstance(out, list | tuple):
        out = out.tolist()  # torch / numpy arrays
    if not isinstance(out, list | tuple):
        raise RewardError(
            f"reward {name!r} returned {type(out).__name__}; expected a list of {n} floats or None"
        )
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if hasattr(v, "item") and not isinstance(v, numbers.Number):
            try:
                v = v.item()  # 0-dim tensor or numpy scalar
            except (ValueError, RuntimeError):
                pass
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward {name!r} returned {type(v).__name__} {v!r} for sample {i}; expected a number or None"
            )
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(
                f"reward {name!r} returned {v} for sample {i}; rewards must be finite (None means no opinion)"
            )
        values.append(v)
    return values
