"""Typed, frozen configs that flatten to ``{"section.key": value}`` and build back."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

__all__ = ["ConfigError", "to_flat_dict", "from_dict", "unflatten", "replace_flat", "parse_overrides", "merge", "base_part",
           "field_help"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and what to do."""


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dataclasses to dotted keys (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r} conflicts with a value at {p!r}")
        node[parts[-1]] = value
    return nested


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if math.isnan(number):  # NaN passes every "<= 0" check: refuse it here, once for all fields
            raise ConfigError(f"{where}: expected a number, got NaN")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dict in (tp, origin):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _onto_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a nested dataclass field lands on the field's own default (e.g.
    ``fake.kind=lora`` keeps the default fake score's rank), not on the nested class's defaults."""
    if not isinstance(value, Mapping):
        return value
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return value
    if not dataclasses.is_dataclass(default):
        return value
    return merge({g.name: getattr(default, g.name) for g in dataclasses.fields(default)}, value)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys under "
            f"{prefix or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {k: _coerce(hints[k], _onto_default(fields[k], v), prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        # A message that starts with a field name reads as its dotted key: "vsd.gen_lr must be ...".
        text = str(e)
        if prefix and text.split(" ", 1)[0] in fields:
            raise ConfigError(prefix + text) from None
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {text}") from None


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build ``cls`` from a nested or flat (dotted) mapping; unknown keys raise ConfigError."""
    if any("." in k for k in data):
        data = unflatten(data)
    return _build(cls, data, "")


def replace_flat(cfg: T, overrides: Mapping[str, Any]) -> T:
    """Return ``cfg`` with dotted overrides applied (``{"vsd.guidance_real": 2.0}``)."""
    flat = to_flat_dict(cfg)
    for k in overrides:
        if k not in flat and not any(f.startswith(k + ".") for f in flat):
            raise ConfigError(f"unknown config key {k!r}; valid keys: {sorted(flat)}")
    flat.update(overrides)
    return from_dict(type(cfg), flat)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.zero_stage=3", "vsd.guidance_real=2"]`` -> dotted dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value or section.key=value "
                              "(e.g. train.zero_stage=2)")
        try:
            out[key.strip()] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it (key='value')") from None
    return out


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings merged key by key (``extra`` wins); other values replaced."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def base_part(cfg: Any, base: type[T], **changes: Any) -> T:
    """The ``base`` dataclass part of ``cfg`` (an instance of a subclass that adds job settings),
    with ``changes`` applied: what a job hands to the library function it drives."""
    return base(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(base)}, **changes})


def field_help(cls: type) -> dict[str, str]:
    """One line per field of dataclass ``cls``: its ``metadata["help"]``, else its attribute
    docstring, else the comment on its line, else the comment lines just above it (the class that
    last declares a field describes it)."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        out.update(_source_help(klass))
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = str(f.metadata["help"])
    return {f.name: out.get(f.name, "") for f in dataclasses.fields(cls)}


@functools.cache
def _source_help(cls: type) -> dict[str, str]:
    """Field descriptions written in the class body (docstring, trailing or leading comments), parsed once."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built in a REPL or by make_dataclass: only metadata can describe it
        return {}
    lines = source.splitlines()
    body = ast.parse(source).body[0]
    out: dict[str, str] = {}
    statements = getattr(body, "body", [])
    for i, node in enumerate(statements):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        after = statements[i + 1] if i + 1 < len(statements) else None
        if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                and isinstance(after.value.value, str):
            out[name] = " ".join(after.value.value.split())
            continue
        trailing = _comment(lines[node.end_lineno - 1])
        if trailing:
            out[name] = trailing
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _comment(line: str) -> str:
    """The ``# comment`` at the end of a source line ("" if none; a '#' inside a string is not one)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ""
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            return "" if text.startswith(("noqa", "type:")) else text
    return ""
