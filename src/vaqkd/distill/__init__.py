"""Distillation: loss terms, virtual anchors and the objective that combines them.

>>> from vaqkd.distill import virtual_anchor
>>> virtual_anchor(torch.tensor([[1.0, 2.0, 3.0, 10.0]]), bits=2).tolist()
[[1.0, 1.0, 4.0, 10.0]]
"""

import torch  # noqa: F401  (for the doctest)

from vaqkd.distill.anchors import virtual_anchor
from vaqkd.distill.contrastive import CRDLoss
from vaqkd.distill.feature import AttentionTransfer, HintLoss
from vaqkd.distill.kd import CrossEntropy, LogitKD
from vaqkd.distill.objective import Objective, build_term
from vaqkd.distill.params import Param
from vaqkd.distill.registry import TERMS

__all__ = [
    "virtual_anchor", "Objective", "build_term", "TERMS", "Param", "CrossEntropy", "LogitKD", "HintLoss",
    "AttentionTransfer", "CRDLoss",
]  # fmt: skip
