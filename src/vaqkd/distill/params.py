"""A loss term's parameters, declared on its class: type, default and range; a term table is checked against them.

>>> p = Param(4.0, lo=0, lo_open=True, doc="softmax temperature")
>>> p.check("distill.terms.1.temperature", 2)
2.0
>>> p.check("distill.terms.1.temperature", 0.0)
Traceback (most recent call last):
...
vaqkd.errors.ConfigError: distill.terms.1.temperature: must be a finite number > 0, got 0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vaqkd.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One parameter of a loss term: its type is its default's (int, float or str)."""

    default: int | float | str
    lo: float | None = None  # lower bound (included unless lo_open)
    hi: float | None = None  # upper bound (included unless hi_open)
    lo_open: bool = False
    hi_open: bool = False
    nonempty: bool = False  # strings only
    doc: str = ""

    def range_text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else ""

    def check(self, key: str, value: Any) -> int | float | str:
        """`value` converted to this parameter's type, or a ConfigError naming `key`."""
        kind = type(self.default)
        if kind is str:
            if not isinstance(value, str) or (self.nonempty and not value):
                raise ConfigError(f"{key}: expected a{' non-empty' if self.nonempty else ''} string, got {value!r}")
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and not (number and isinstance(value, int)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if kind is float and not number:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        v = kind(value)
        low = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        high = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        if not (low and high):
            what = "a finite number" if kind is float else "an integer"
            raise ConfigError(f"{key}: must be {what} {self.range_text()}, got {value!r}")
        return v


def resolve(params: Mapping[str, Param], given: Mapping[str, Any], prefix: str, kind: str) -> dict[str, Any]:
    """Every declared parameter's value (given or default, checked), in declaration order; a key that is not
    declared is a ConfigError naming it and listing the term's parameters."""
    for k in given:
        if k not in params:
            allowed = ", ".join(params) or "none besides kind, weight and the anchors"
            raise ConfigError(f"{prefix}.{k}: not a parameter of the {kind!r} term (its parameters: {allowed})")
    return {k: p.check(f"{prefix}.{k}", given[k]) if k in given else p.default for k, p in params.items()}


@dataclass(frozen=True)
class BuildContext:
    """What a term's `build` may use besides its parameters: the channels of the stages the terms read (student
    and teacher), the training labels in dataset-index order, and the run's seed."""

    s_channels: Mapping[str, int]
    t_channels: Mapping[str, int]
    train_labels: Any  # torch.Tensor (N,)
    seed: int = 0
