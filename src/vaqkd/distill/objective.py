"""A distillation method is a weighted list of loss terms; virtual anchors add copies of a term.

    total = Σ_i w_i · L_i(S, r_T,i) + Σ_i Σ_b w_i,b · L_i(S, Q(r_T,i, b))

Every named part (e.g. "ce", "kd", "kd@va4") is returned unweighted next to the weighted total, so each can
be logged. A term module has `target(teacher_feats) -> r_T` (the representation to match) and
`forward(student_feats, r, labels, index=, step=, anchor=) -> scalar`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from vaqkd.distill.anchors import virtual_anchor
from vaqkd.distill.contrastive import CRDLoss
from vaqkd.distill.feature import AttentionTransfer, HintLoss
from vaqkd.distill.kd import CrossEntropy, LogitKD

if TYPE_CHECKING:  # config imports TERMS from here: no import at run time, no circle
    from vaqkd.config import TermConfig

TERMS = ("ce", "kd", "hint", "at", "crd")


def build_term(
    cfg: TermConfig, s_channels: dict[str, int], t_channels: dict[str, int], train_labels: torch.Tensor, seed: int = 0
) -> nn.Module:
    if cfg.kind == "ce":
        return CrossEntropy()
    if cfg.kind == "kd":
        return LogitKD(cfg.temperature)
    if cfg.kind == "hint":
        t_stage = cfg.teacher_stage or cfg.stage
        return HintLoss(cfg.stage, s_channels[cfg.stage], t_channels[t_stage], t_stage)
    if cfg.kind == "at":
        return AttentionTransfer(cfg.stage, cfg.teacher_stage)
    if cfg.kind == "crd":
        return CRDLoss(
            s_channels["embedding"],
            t_channels["embedding"],
            train_labels,
            cfg.feat_dim,
            cfg.nce_k,
            cfg.nce_t,
            cfg.nce_momentum,
            seed,
        )
    raise KeyError(f"unknown loss term {cfg.kind!r}; registered: {TERMS}")


def stages_of(terms: Sequence[TermConfig], teacher: bool = False) -> tuple[str, ...]:
    """Stages (aliases or module paths) that a list of terms reads from the student (or the teacher)."""
    out = [(t.teacher_stage or t.stage) if teacher else t.stage for t in terms if t.kind in ("hint", "at")]
    out += ["embedding" for t in terms if t.kind == "crd"]
    return tuple(dict.fromkeys(out))


def part_names(terms: Sequence[TermConfig]) -> list[str]:
    names, seen = [], {}
    for t in terms:
        k = seen[t.kind] = seen.get(t.kind, 0) + 1
        base = t.kind if k == 1 else f"{t.kind}{k}"
        names.append(base)
        names += [f"{base}@va{b}" for b in t.anchor_bits]
    return names


class Objective(nn.Module):
    def __init__(self, terms: Sequence[TermConfig], modules: Sequence[nn.Module]):
        super().__init__()
        self.cfgs = tuple(terms)
        self.terms = nn.ModuleList(modules)
        self.names = part_names(terms)
        self.uses_teacher = any(getattr(m, "uses_teacher", False) for m in modules)
        self.stages = stages_of(terms)  # the named tensors the terms read, besides the logits
        self.teacher_stages = stages_of(terms, teacher=True)

    def forward(
        self, s: dict[str, torch.Tensor], t: dict[str, torch.Tensor] | None, labels: torch.Tensor,
        index: torch.Tensor | None = None, step: int = 0, part: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """`part` = (p, P): these samples are part p of P equal parts of the step's batch (ranks x micro-batches);
        terms with per-batch random draws (CRD's negatives) draw for the whole batch and take part p."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=labels.device)
        names = iter(self.names)
        for cfg, term in zip(self.cfgs, self.terms):
            r = term.target(t)
            cache: dict = {}  # this term's per-step state (projections, negatives), shared with its anchors only
            loss = term(s, r, labels, index=index, step=step, cache=cache, part=part)
            parts[next(names)] = loss.detach()
            total = total + cfg.weight * loss
            for bits, w in zip(cfg.anchor_bits, cfg.anchor_weights):
                anchor = virtual_anchor(r, bits, cfg.anchor_mode)
                loss_va = term(s, anchor, labels, index=index, step=step, anchor=True, cache=cache, part=part)
                parts[next(names)] = loss_va.detach()
                total = total + w * loss_va
        return total, parts
