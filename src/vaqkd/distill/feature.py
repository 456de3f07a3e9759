"""Feature-map losses on a named stage: FitNet hints and attention transfer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.distill.params import BuildContext, Param

STAGE_PARAMS = {
    "stage": Param("layer2", nonempty=True, doc="the student's stage: stem, layer1..3 or a module path"),
    "teacher_stage": Param("", doc='the teacher\'s stage when its name differs ("": the same as stage)'),
}


def _stages(p: Mapping, teacher: bool = False) -> tuple[str, ...]:
    return ((p["teacher_stage"] or p["stage"]) if teacher else p["stage"],)


class HintLoss(nn.Module):
    """FitNets (Romero et al. 2015): L = MSE(reg(f_S), f_T) on a named stage, reg = 1x1 conv + BN. The student's
    and the teacher's stage may have different names (a module path of a user's model vs "layer2").

    Example term: `{kind = "hint", weight = 100.0, stage = "layer2"}` (the CIFAR-100 recipe's weight).
    """

    kind = "hint"
    params: Mapping[str, Param] = STAGE_PARAMS
    uses_teacher = True
    heads: tuple[str, ...] = ("regressor",)
    stages = staticmethod(_stages)

    @classmethod
    def build(cls, p: Mapping, ctx: BuildContext) -> HintLoss:
        t_stage = p["teacher_stage"] or p["stage"]
        return cls(p["stage"], ctx.s_channels[p["stage"]], ctx.t_channels[t_stage], t_stage)

    def __init__(self, stage: str, s_channels: int, t_channels: int, teacher_stage: str = ""):
        super().__init__()
        self.stage, self.teacher_stage = stage, teacher_stage or stage
        self.regressor = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))

    def target(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t[self.teacher_stage]

    def forward(self, s: dict[str, torch.Tensor], r: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None, step: int = 0, anchor: bool = False, cache: dict | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:  # fmt: skip
        cache = {} if cache is None else cache  # this term's per-step state, shared with its anchors
        proj = cache.get("proj")
        if proj is None:  # one projection (this term's regressor) serves its FP32 term and its anchors
            proj = cache["proj"] = self.regressor(s[self.stage]).float()
        return F.mse_loss(proj, r.float())


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: a = normalize(mean_c f²), flattened. f: (B, C, H, W) -> (B, H*W)."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


class AttentionTransfer(nn.Module):
    """L_AT = ‖a(f_S) - a(f_T)‖² (mean over the batch) on a named stage; typical weight 1000.

    Example term: `{kind = "at", weight = 1000.0, stage = "layer2"}`.
    """

    kind = "at"
    params: Mapping[str, Param] = STAGE_PARAMS
    uses_teacher = True
    heads: tuple[str, ...] = ()
    stages = staticmethod(_stages)

    @classmethod
    def build(cls, p: Mapping, ctx: BuildContext) -> AttentionTransfer:
        return cls(p["stage"], p["teacher_stage"])

    def __init__(self, stage: str, teacher_stage: str = ""):
        super().__init__()
        self.stage, self.teacher_stage = stage, teacher_stage or stage

    def target(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t[self.teacher_stage]

    def forward(self, s: dict[str, torch.Tensor], r: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None, step: int = 0, anchor: bool = False, cache: dict | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:  # fmt: skip
        return (attention_map(s[self.stage]) - attention_map(r)).pow(2).mean()
