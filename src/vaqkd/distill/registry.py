"""The loss terms by name: the one list a new term is added to.

Each term class declares itself (see `distill.objective.Term`): `kind` (its name in a config), `params` (its
own parameters with types, ranges and defaults), `uses_teacher`, `heads` (its trainable modules),
`stages(params, teacher)` (the named tensors it reads besides the logits) and `build(params, ctx)`. The
config's checks, the objective and the parametrised tests are derived from these declarations.
"""

from __future__ import annotations

from vaqkd.distill.contrastive import CRDLoss
from vaqkd.distill.feature import AttentionTransfer, HintLoss
from vaqkd.distill.kd import CrossEntropy, LogitKD

TERMS: dict[str, type] = {cls.kind: cls for cls in (CrossEntropy, LogitKD, HintLoss, AttentionTransfer, CRDLoss)}
