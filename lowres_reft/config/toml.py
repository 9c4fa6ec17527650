"""Typed TOML values: check/convert a parsed TOML value against a type hint, name a type for an error message,
and write a Python value back as TOML. No knowledge of recipes here (that is `config.py`).
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

import tomllib


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", bool: "booleans (true/false)", str: "strings"}.get(item)
        return f"a list of {plural}" if plural else f"a list, each item {type_name(item)}"
    if origin is dict:
        return "a table, e.g. { key = 1 }"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise TypeError. TOML already gives typed values."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(coerce(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "+inf"):
            return math.inf
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise TypeError
    raise AssertionError(f"unsupported config type {tp}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise AssertionError(f"cannot write {value!r} as TOML")


_TOML_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: TOML forbids raw control characters (and DEL) in strings."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c


# Recipe keys that may differ when a run is resumed (`run --resume`): how long it runs, how often it evaluates,
# checkpoints and logs, where it writes, memory knobs that do not change the math, and export settings. Every other
# key determines the run (model, LoRA, data, behavior, rollout, reward, loss, optimizer, seed, ...) and is fixed
# by its first checkpoint. train.steps may change: the LR schedule's total becomes the new steps from the resumed
# update on (a "constant" schedule is unaffected; a decaying one continues along the new horizon).


def read_value(raw: str, tp: Any) -> Any:
    """A value typed on the command line: read as TOML (`3`, `1e-4`, `true`, `["a"]`), else as a bare string; and
    as the bare string whenever the key (of type hint `tp`) takes a string."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if not isinstance(value, str) and _is_string_type(tp):
        return raw
    return value


def _is_string_type(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp is str or typing.get_origin(tp) is Literal


def recipe_to_toml(recipe) -> str:
    """Serialize a recipe (`config.Recipe`) back to TOML (`lowres-reft check` prints it)."""
    return "\n".join(f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
                     for section, values in recipe.to_dict().items())
