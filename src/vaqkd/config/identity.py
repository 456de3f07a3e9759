"""A run's identity: the canonical text a resolved config is hashed from (what decides its result, not where files
lie or how the file is laid out), the settings that only choose the arithmetic, and where two configs differ."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vaqkd.config.schema import LEGACY_TERM_KEYS


def _canonical_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_canonical_value(x) for x in v) + "]"
    return repr(v)


def canonical_text(d: dict) -> str:
    """A resolved config's table as the text its identity is hashed from: one `key = value` line per key, lists on
    one line, every term with every legacy key (LEGACY_TERM_KEYS) — byte for byte the text runs were written as
    (and hashed from) before config files were written with tomli-w, whose arrays span several lines."""
    d = dict(d)
    lines = [f"name = {_canonical_value(d.pop('name'))}"]
    for section, body in d.items():
        body = dict(body)
        terms = body.pop("terms", None)
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_canonical_value(v)}" for k, v in body.items()]
        for t in terms or []:
            lines.append(f"\n[[{section}.terms]]")
            lines += [f"{k} = {_canonical_value(v)}" for k, v in {**LEGACY_TERM_KEYS, **t}.items()]
    return "\n".join(lines) + "\n"


# Fields added after runs were recorded: while at their default they are left out of a run's identity (its
# config hash, the resume check), so records and run directories made before the field existed still match.
LATER_DEFAULTS = ('teacher_stage = ""', "micro_batches = 1", "sync_bn = false", 'residual = "float"',
                  "residual_bits = 0", "freeze_weights_epochs = 0.0",
                  'weight_init = "lsq"', "bn_reestimate_batches = 0")


def identity(toml_text: str) -> str:
    """A resolved config's text as a run's identity: what decides its result, not where files lie or how the
    file is laid out (`canonical_text`). Left out: `data.root` (where the dataset lives) and later fields at their
    defaults (LATER_DEFAULTS); a teacher or init that is a run directory counts by its name (which holds its own
    config hash), not its location."""
    out = []
    for ln in canonical_text(tomllib.loads(toml_text)).splitlines(keepends=True):
        key, _, value = ln.strip().partition(" = ")
        if ln.strip() in LATER_DEFAULTS or key == "root":
            continue
        if key in ("teacher", "init") and "/" in value:
            ln = f'{key} = "{Path(value.strip().strip(chr(34))).name}"\n'
        out.append(ln)
    return "".join(out)


# Settings that choose how a run computes, not what it computes: two records whose configs differ only in these
# are the same experiment on other arithmetic (the report collects both, `records.other_arithmetic`, and holds them
# apart by their recorded arithmetic and machine). Each has its own run identity, so neither resumes the other.
ARITHMETIC_SETTINGS = {"train": ("device", "precision", "threads", "channels_last")}


def differences(a_text: str, b_text: str, limit: int = 3) -> str:
    """Where two config texts differ, key by key: "optim.lr 0.05 -> 0.02" (a key one lacks: "(absent)"); the
    first `limit`, then how many more."""

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):  # [[distill.terms]]
            return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}.").items()}
        return {prefix[:-1]: obj}

    a, b = flat(tomllib.loads(a_text)), flat(tomllib.loads(b_text))
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "(absent)") != b.get(k, "(absent)")]
    if not keys and a_text != b_text:
        return "the same values, written another way"
    said = [f"{k} {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys[:limit]]
    return ", ".join(said) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
