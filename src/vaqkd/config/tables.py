"""Config <-> plain tables, every key and type checked (`from_dict`, `to_dict`), and the TOML a run directory holds
(`to_toml`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import tomli_w

from vaqkd.config.schema import LEGACY_TERM_KEYS, Config, TermConfig, check
from vaqkd.errors import ConfigError


def _term_from_table(d: dict, prefix: str) -> TermConfig:
    """A term table: the keys of TermConfig, the rest the term's own parameters (checked against its class)."""
    from vaqkd.distill.objective import term_class, term_params

    common = {f.name for f in dataclasses.fields(TermConfig)} - {"params"}
    t = from_dict(TermConfig, {k: v for k, v in d.items() if k in common}, prefix, plain=True)
    own = term_class(t.kind, f"{prefix}.kind").params
    given = {k: v for k, v in d.items() if k not in common and (k in own or LEGACY_TERM_KEYS.get(k, ...) != v)}
    return dataclasses.replace(t, params=term_params(t.kind, given, prefix))


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check(key, isinstance(value, dict), f"expected a table, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        check(key, isinstance(value, (list, tuple)), f"expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{key}.{i}", inner, v) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported type {tp}")
    if tp is float:  # inf and nan are refused everywhere: no setting means anything at either
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(key, number, f"expected a number, got {value!r}")
        check(key, math.isfinite(value), f"expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        check(key, isinstance(value, int) and not isinstance(value, bool), f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        check(key, isinstance(value, bool), f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # e.g. first_last = 8
        check(key, isinstance(value, str), f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {tp}")


def from_dict(cls: type, d: dict, prefix: str = "", plain: bool = False) -> Any:
    """A dataclass from a table, every key checked (`plain`: a TermConfig's own keys only, not its params)."""
    if cls is TermConfig and not plain:
        return _term_from_table(d, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{k}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(f"{prefix + '.' if prefix else ''}{k}", hints[k], v) for k, v in d.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A config as plain tables; a term's own parameters sit in its table beside kind and weight."""
    if isinstance(obj, TermConfig):
        d = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"kind": d.pop("kind"), "weight": d.pop("weight"), **d.pop("params"), **d}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (loads back with `load_config` to an equal Config)."""
    return tomli_w.dumps(to_dict(cfg))
