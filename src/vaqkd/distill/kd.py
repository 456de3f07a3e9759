"""Logit losses: hard-label cross-entropy and Hinton's knowledge distillation."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.distill.params import BuildContext, Param


class CrossEntropy(nn.Module):
    """L_CE = CE(z_S, y). Uses no teacher (so it takes no anchors).

    Example term: `{kind = "ce", weight = 1.0}`.
    """

    kind = "ce"
    params: Mapping[str, Param] = {}
    uses_teacher = False
    heads: tuple[str, ...] = ()

    @staticmethod
    def stages(p: Mapping, teacher: bool = False) -> tuple[str, ...]:
        return ()

    @classmethod
    def build(cls, p: Mapping, ctx: BuildContext) -> CrossEntropy:
        return cls()

    def target(self, t: dict[str, torch.Tensor] | None) -> None:
        return None

    def forward(self, s: dict[str, torch.Tensor], r: None, labels: torch.Tensor, index: torch.Tensor | None = None,
                step: int = 0, anchor: bool = False, cache: dict | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:  # fmt: skip
        return F.cross_entropy(s["logits"].float(), labels)


class LogitKD(nn.Module):
    """Hinton et al. 2015: L_KD = T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)), batch mean.

    Example term: `{kind = "kd", weight = 0.9, temperature = 4.0}`.
    """

    kind = "kd"
    params: Mapping[str, Param] = {"temperature": Param(4.0, lo=0, lo_open=True, doc="softmax temperature T")}
    uses_teacher = True
    heads: tuple[str, ...] = ()

    @staticmethod
    def stages(p: Mapping, teacher: bool = False) -> tuple[str, ...]:
        return ()

    @classmethod
    def build(cls, p: Mapping, ctx: BuildContext) -> LogitKD:
        return cls(p["temperature"])

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def target(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["logits"]

    def forward(self, s: dict[str, torch.Tensor], r: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None, step: int = 0, anchor: bool = False, cache: dict | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:  # fmt: skip
        T = self.temperature
        cache = {} if cache is None else cache  # this term's per-step state, shared with its anchors
        log_p_s = cache.get("log_p_s")
        if log_p_s is None:
            log_p_s = cache["log_p_s"] = F.log_softmax(s["logits"].float() / T, dim=1)
        log_p_t = F.log_softmax(r.float() / T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T
