"""Config files and overrides: TOML files that may refine a base file, `--set section.key=value` overrides, and the
checked Config they make (an error about a value a file gave names the file)."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vaqkd.config.schema import Config, check
from vaqkd.config.tables import from_dict
from vaqkd.errors import ConfigError, resolved


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


# An override is `"section.key=value"` as `--set` gives it (the value in TOML syntax; a bare word is a string) or a
# `(key, value)` pair holding the Python value itself — what the library passes (a path is never pasted into TOML).
Override = str | tuple[str, Any]


def override_key(override: Override) -> str:
    return override[0] if isinstance(override, tuple) else override.partition("=")[0].strip()


def apply_override(d: dict, override: Override) -> None:
    """Apply one override to a config table (list items addressed by index: `distill.terms.1.weight=0.9`)."""
    if isinstance(override, tuple):
        path, value = override
    else:
        path, eq, text = override.partition("=")
        if not eq:
            raise ConfigError(f"{override!r}: an override must look like section.key=value")
        value = _parse_value(text.strip())
    keys = path.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"{override!r}: an override must look like section.key=value")
    node: Any = d
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            check(path, k.isdigit() and int(k) < len(node), f"no list item {k!r}")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
            check(".".join(keys[: i + 1]), isinstance(node, (dict, list)), "is a value, not a table")
    last = keys[-1]
    if isinstance(node, list):
        check(path, last.isdigit() and int(last) < len(node), f"no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def load_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a table; `base = "other.toml"` (relative to the file) names a file whose keys it refines."""
    path = Path(path)
    if resolved(path) in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved(path)))
        raise ConfigError(f"{path}: base files form a loop ({chain})")
    try:
        with open(path, "rb") as f:
            d = tomllib.loads(f.read().decode("utf-8").removeprefix("\ufeff"))  # an editor's byte-order mark
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    for f in dataclasses.fields(Config):  # a section written as [[data]] (a list) or `data = 1`: said as such
        if f.name in d and f.name != "name" and not isinstance(d[f.name], dict):
            raise ConfigError(f"{path}: [{f.name}] must be a table, got a {type(d[f.name]).__name__}")
    base = d.pop("base", None)
    if base is not None:  # a preset names the file it refines: its keys override the base's
        check(f"{path}: base", isinstance(base, str) and bool(base), f"must name a file, got {base!r}")
        parent = load_dict(path.parent / base, (*_seen, resolved(path)))
        merge(parent, d)
        d = parent
    return d


def merge(into: dict, new: dict) -> None:
    """Merge `new` into `into` recursively (tables merge, values replace)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def load_config(path: str | Path | None = None, overrides: Sequence[Override] = ()) -> Config:
    """A config file (or the defaults) with the overrides applied, checked (`validated`: an error about a value
    the file gave names the file)."""
    d = load_dict(path) if path else {}
    layers = [(str(path), copy.deepcopy(d))] if path else []
    for o in overrides:
        apply_override(d, o)
    return validated(d, overrides, layers)


def _sets(table: dict, key: str) -> bool:
    """Whether a config table (as read, lists of terms included) holds the dotted `key`."""
    node: Any = table
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def validated(d: dict, overrides: Sequence[Override] = (), layers: Sequence[tuple[str, dict]] = ()) -> Config:
    """`from_dict(Config, d).validate()`. An error about a key no override set, whose value one of `layers`
    ((name, its table as read): a config file, a preset's [student] section) gave, names the last such layer —
    the key whose value is refused; a range that depends on another key (warmup_epochs < epochs) is said of it."""
    try:
        return from_dict(Config, d).validate()
    except ConfigError as e:
        key = str(e).partition(":")[0]
        overridden = any(key == k or key.startswith(k + ".") for k in map(override_key, overrides))
        where = next((name for name, table in reversed(layers) if _sets(table, key)), None)
        if where and not overridden:
            raise ConfigError(f"{where}: {e}") from None
        raise
