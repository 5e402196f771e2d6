"""Typed, frozen configuration objects built from plain data (parsed YAML, CLI overrides).

Configuration is parsed once, at the edge, into frozen dataclasses; nothing downstream handles nested
dicts. Every error names the dotted path of the offending field and says what is allowed.

Validation inside a dataclass's ``__post_init__`` raises :class:`ConfigError` with the field name as
its path; :func:`from_dict` prefixes it with the path of the enclosing object.
"""
from __future__ import annotations

import functools
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else name


def _prefixed(err: ConfigError, prefix: str) -> ConfigError:
    """The same error (same class) with its path prefixed by the enclosing object's path."""
    if prefix:
        err.path = _join(prefix, err.path) if err.path else prefix
        err.args = (f"{err.path}: {err.message}",)
    return err


def _describe(tp: Any) -> str:
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is tuple:
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` and convert it (lists to tuples, dicts to
    dataclasses, ints to floats). Raises ConfigError naming ``path``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(path, f"{value!r} is not allowed; expected {_describe(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is tuple:
        return _coerce_tuple(tp, value, path)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {coerce(key_tp, k, path): coerce(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp in _SCALARS:
        return _SCALARS[tp](value, path)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")


def _coerce_union(tp: Any, value: Any, path: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(arg, value, path)
        except ConfigError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")


def _coerce_tuple(tp: Any, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list, got {value!r}")
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(args[0], v, _join(path, i)) for i, v in enumerate(value))
    if len(args) != len(value):
        raise ConfigError(path, f"expected a list of {len(args)} items, got {len(value)}")
    return tuple(coerce(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value)))


def _coerce_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected a boolean (true/false), got {value!r}")
    return value


def _coerce_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if abs(value) > 2**63 - 1:
        raise ConfigError(path, f"{value} is far beyond any meaningful value (|n| < 2^63)")
    return value


def _coerce_float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(path, f"expected a finite number, got {value!r}")
    return number


def _coerce_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {value!r}")
    return value


_SCALARS: dict[Any, Any] = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}
_PLAIN = frozenset({bool, int, float, str})  # exactly these types (a subclass takes the general path)


@functools.cache  # resolving annotations compiles every one of them: most of a large grid's planning time
def field_types(cls: type) -> Mapping[str, Any]:
    """The resolved annotations of a dataclass's init fields (read-only, computed once per class)."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init})


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a mapping, recursively.

    Raises:
        ConfigError: an unknown or missing key, a value of the wrong type, or a value its class
            rejects; the error's path is the dotted path of the field.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping ({cls.__name__}), got {data!r}")
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise ConfigError(
            _join(path, str(unknown[0])),
            f"unknown key; valid keys here: {', '.join(sorted(types_))}",
        )
    kwargs = {}
    for name, tp in types_.items():
        if name in data:
            kwargs[name] = coerce(tp, data[name], _join(path, name))
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in kwargs
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if required:
        raise ConfigError(_join(path, required[0]), "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise _prefixed(err, path) from None


@functools.cache
def _init_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config object (dataclasses to dicts, tuples to lists)."""
    if obj is None or type(obj) in _PLAIN:  # most values: no dataclass or ABC checks (a grid's planning time)
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_dict(getattr(obj, name)) for name in _init_fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def with_overrides(obj: T, overrides: Mapping[str, Any], path: str = "") -> T:
    """A copy of the config ``obj`` with dotted-path overrides applied (``{"activation.kind": "prelu"}``,
    list items by index: ``{"lambda_groups[0].lambda_end": 50}``) and validated exactly as if the
    result had been parsed from data.

    Only the sections on an override's path are taken apart and built again (each validated by its
    class, and every enclosing one by its own); the others are kept as they are, already valid, as
    parsing would build them again (a grid's rows: linear planning with small constants).

    Raises:
        ConfigError: a path that does not exist or a value that is not allowed.
    """
    data = _opened(obj)
    for dotted, value in overrides.items():
        parts = path_steps(dotted)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = _join(path, _render(parts[: i + 1]))
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise ConfigError(where, f"no item {part} (the list has {size})")
                node[part] = _opened(node[part])
                node = node[part]
                continue
            if isinstance(node, dict) and part in node:
                node[part] = _opened(node[part])
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], (dict, list)):
                raise ConfigError(where, "no such config section")
            node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(_join(path, dotted), f"no item {last} in this list")
        elif not isinstance(node, dict) or last not in node:
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "none (a list)"
            raise ConfigError(_join(path, dotted), f"unknown key; valid keys here: {valid}")
        node[last] = to_dict(value)
    return from_dict(type(obj), data, path)


def _opened(value: Any) -> Any:
    """One level of a config value as data to edit: a dataclass as a dict of its init fields, a list
    or mapping as a copy (its items as they are; nothing the original holds is changed)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: getattr(value, name) for name in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def path_steps(dotted: str) -> list[str | int]:
    """``"lambda_groups[1].lambda_end"`` -> ``["lambda_groups", 1, "lambda_end"]``."""
    steps: list[str | int] = []
    for part in dotted.split("."):
        name, bracket, rest = part.partition("[")
        if name:
            steps.append(name)
        while bracket:
            index, _, rest = rest.partition("]")
            if not index.isdigit():
                raise ConfigError(dotted, "a list index is a non-negative integer in brackets: name[0]")
            steps.append(int(index))
            _, bracket, rest = rest.partition("[")
    return steps


def _render(steps: list[str | int]) -> str:
    out = ""
    for s in steps:
        out = f"{out}[{s}]" if isinstance(s, int) else (f"{out}.{s}" if out else s)
    return out


def require(condition: bool, path: str, message: str) -> None:
    """Raise ConfigError(path, message) unless ``condition`` holds (for ``__post_init__`` checks)."""
    if not condition:
        raise ConfigError(path, message)
