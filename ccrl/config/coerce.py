"""YAML values → config dataclasses: type coercion with errors that name the key path.

Generic over the dataclasses of ``ccrl.config.schema``: a mapping becomes an instance of a
class when its keys are the class's fields (unknown keys fail with a did-you-mean) and each value
coerces to the field's annotation (``int``, ``float``, ``str``, ``bool``, ``Literal``, unions,
lists, mappings, nested dataclasses). A ``ValueError`` from ``__post_init__`` becomes a
:class:`ccrl.errors.RecipeError` naming the section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from ccrl.errors import RecipeError


def from_dict(cls, data: Any, where: str, source: str, prebuilt: tuple = ()):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            public = [f for f in fields if f not in ("raw", "source")]
            raise RecipeError(f"{source}: {path}: unknown key" + did_you_mean(str(key), public)
                              + f" (valid keys: {', '.join(sorted(public))})")
        kwargs[key] = value if key in prebuilt else _coerce(value, hints[key], path, source)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{source}: {where + '.' if where else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise RecipeError(f"{source}: {where or 'recipe'}: {e}") from None


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, source)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:   # X | None: X's own error names the inner key (stages[1].peft.r)
            raise errors[0]
        raise RecipeError(f"{source}: {path}: expected {_type_name(tp)}, got {value_repr(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(f"{source}: {path}: expected one of {list(args)}, got {value!r}"
                          + did_you_mean(str(value), [str(a) for a in args]))
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {path}: expected a list, got {value_repr(value)}")
        return [_coerce(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {path}: expected a mapping, got {value_repr(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):   # NaN would pass every range check (all comparisons are false)
                raise RecipeError(f"{source}: {path}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{source}: {path}: expected {_type_name(tp)}, got {value_repr(value)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + (
            " (or null)" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def value_repr(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""

