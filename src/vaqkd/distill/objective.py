"""A distillation method is a weighted list of loss terms; virtual anchors add copies of a term.

    total = Σ_i w_i · L_i(S, r_T,i) + Σ_i Σ_b w_i,b · L_i(S, Q(r_T,i, b))

Every named part (e.g. "ce", "kd", "kd@va4") is returned unweighted next to the weighted total, so each can
be logged. A term is an `nn.Module` that declares itself (see `registry`): `kind`, `params`, `uses_teacher`,
`heads`, `stages(params, teacher)` and `build(params, ctx)`; it has `target(teacher_feats) -> r_T` (the
representation to match) and `forward(student_feats, r, labels, index=, step=, anchor=, cache=, shard=) -> scalar`.
A term's weight and anchors live in its config (`TermConfig`), not inside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from vaqkd.distill.anchors import virtual_anchor
from vaqkd.distill.params import BuildContext, resolve
from vaqkd.distill.registry import TERMS
from vaqkd.errors import ConfigError


class TermSpec(Protocol):
    """What the objective reads of a term's entry in a config (`config.TermConfig` is one)."""

    kind: str
    weight: float
    params: Mapping[str, Any]
    anchor_bits: tuple[int, ...]
    anchor_weights: tuple[float, ...]
    anchor_mode: str


def term_class(kind: str, key: str = "kind") -> type:
    """The registered class of a loss term, or a ConfigError naming `key`."""
    if kind not in TERMS:
        raise ConfigError(f"{key}: unknown loss term {kind!r}; registered: {sorted(TERMS)}")
    return TERMS[kind]


def term_params(kind: str, given: Mapping[str, Any], prefix: str = "term") -> dict[str, Any]:
    """A term's parameters checked against its declaration, with the defaults filled in."""
    return resolve(term_class(kind, f"{prefix}.kind").params, given, prefix, kind)


def build_term(cfg: TermSpec, s_channels: dict[str, int], t_channels: dict[str, int], train_labels: torch.Tensor,
               seed: int = 0) -> nn.Module:  # fmt: skip
    """The loss module a term's config names, built by its own class."""
    return term_class(cfg.kind).build(term_params(cfg.kind, cfg.params), BuildContext(s_channels, t_channels,
                                                                                      train_labels, seed))


def stages_of(terms: Sequence[TermSpec], teacher: bool = False) -> tuple[str, ...]:
    """Stages (aliases or module paths) that a list of terms reads from the student (or the teacher)."""
    out = [s for t in terms for s in term_class(t.kind).stages(term_params(t.kind, t.params), teacher)]
    return tuple(dict.fromkeys(out))


def part_sources(terms: Sequence[TermSpec]) -> dict[str, tuple[int, int | None]]:
    """Each part's name -> (index of its term, index of its anchor or None): "kd", "kd@va2", "hint2", ..."""
    out, seen = {}, {}
    for i, t in enumerate(terms):
        k = seen[t.kind] = seen.get(t.kind, 0) + 1
        base = t.kind if k == 1 else f"{t.kind}{k}"
        out[base] = (i, None)
        out.update({f"{base}@va{b}": (i, j) for j, b in enumerate(t.anchor_bits)})
    return out


def part_names(terms: Sequence[TermSpec]) -> list[str]:
    return list(part_sources(terms))


class Objective(nn.Module):
    """The weighted sum of a method's terms and their anchors; `forward` returns (total, parts)."""

    def __init__(self, terms: Sequence[TermSpec], modules: Sequence[nn.Module]):
        super().__init__()
        self.term_configs = tuple(terms)  # weights and anchors of each term
        self.terms = nn.ModuleList(modules)  # the loss modules (the name is the checkpoints' key prefix)
        self.names = part_names(terms)
        self.uses_teacher = any(m.uses_teacher for m in modules)
        self.stages = stages_of(terms)  # the named tensors the terms read, besides the logits
        self.teacher_stages = stages_of(terms, teacher=True)

    def forward(
        self, s: dict[str, torch.Tensor], t: dict[str, torch.Tensor] | None, labels: torch.Tensor,
        index: torch.Tensor | None = None, step: int = 0, shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """`shard` = (p, P): these samples are shard p of P equal shards of the step's batch (ranks x
        micro-batches); terms with per-batch random draws (CRD's negatives) draw for the whole batch and take
        shard p."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=labels.device)
        names = iter(self.names)
        for cfg, term in zip(self.term_configs, self.terms):
            r = term.target(t)
            cache: dict = {}  # this term's per-step state (projections, negatives), shared with its anchors only
            loss = term(s, r, labels, index=index, step=step, cache=cache, shard=shard)
            parts[next(names)] = loss.detach()
            total = total + cfg.weight * loss
            for bits, w in zip(cfg.anchor_bits, cfg.anchor_weights):
                anchor = virtual_anchor(r, bits, cfg.anchor_mode)
                loss_va = term(s, anchor, labels, index=index, step=step, anchor=True, cache=cache, shard=shard)
                parts[next(names)] = loss_va.detach()
                total = total + w * loss_va
        return total, parts
