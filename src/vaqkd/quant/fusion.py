"""The quantized fast path of residual stages: `install_fusions(model)` after `quantize()`, where a student is
built (`rundir.build_student`) and where a packed artifact is loaded; `remove_fusions()` takes it out.

A plain `BasicBlock` computes relu(bn1(conv1(x))) -> conv2 -> relu(bn2(...) + shortcut(x)). Once its convs
are quantized, two passes can go:
  * the ReLU before conv2, where conv2's input quantizer clamps at zero (q(relu(x)) = q(x), gradients too);
  * the block's closing ReLU and the next block's input quantizer, computed in one fused pass
    (`Quantizer.relu_quant`: h = relu(a + shortcut) and q(h) together), the quantized tensor handed on
    explicitly to the next block's conv1 (`QConv2d.forward_quantized`).
`FusedStage` (an nn.Sequential of such blocks, same state-dict keys) runs its blocks that way, passing
(h, q(h)) from block to block as values: no module state is written during forward. A stage whose blocks
carry hooks, or any module inside them (features taken by module path, the size/BOPs dry run), runs its
blocks one by one through their ordinary `forward`, the plain path, so every hook fires. Outputs and
gradients equal the plain blocks'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.models.resnet_cifar import BasicBlock
from vaqkd.quant.layers import QConv2d


class QuantBasicBlock(BasicBlock):
    """A BasicBlock with quantized convolutions: `forward` as the plain block (the ReLU before conv2 skipped
    where conv2's quantizer absorbs it), `forward_fused` for `FusedStage`."""

    def _body(self, x: torch.Tensor, x_hat: torch.Tensor | None, codes: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bn1(self.conv1(x) if x_hat is None else self.conv1.forward_quantized(x_hat, codes))
        if not self.conv2.input_clamps_at_zero:
            out = F.relu(out)
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._body(x, None) + self.shortcut(x))

    def forward_fused(self, x: torch.Tensor, x_hat: torch.Tensor | None, codes: torch.Tensor | None,
                      next_conv: QConv2d | None):  # fmt: skip
        """(h, q(h), codes): the block output and, where the next block's input quantizer has a fused kernel,
        that conv's quantized input made in the same pass (else None), with its uint8 codes where the conv
        reads them (`QConv2d.wants_codes`, else None). `x_hat`, `codes`: this block's input already quantized
        (None: not)."""
        out, sc = self._body(x, x_hat, codes), self.shortcut(x)
        if next_conv is None:
            return F.relu(out + sc), None, None
        q = next_conv.a_quant
        fused = q.relu_quant_codes(out, sc) if next_conv.wants_codes(out) else q.relu_quant(out, sc)
        if fused is None:
            return F.relu(out + sc), None, None
        return fused if len(fused) == 3 else (*fused, None)


class FastStage(nn.Sequential):
    """A stage of residual blocks that runs a fast path of its own (`FusedStage`; the integer residual's
    `quant.residual.IntStage`); `remove_fusions` turns it back into a plain nn.Sequential."""


class FusedStage(FastStage):
    """Residual blocks run with the block-boundary fusion (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        if _hooked(self):
            for b in blocks:  # hooks must see every module's output: the plain path
                x = b(x)
            return x
        x_hat = codes = None
        for i, b in enumerate(blocks):
            nxt = blocks[i + 1].conv1 if i + 1 < len(blocks) else None
            x, x_hat, codes = b.forward_fused(x, x_hat, codes, nxt)
        return x


def _hooked(stage: nn.Module) -> bool:
    """Whether any module inside the stage (or every module, globally) has forward hooks."""
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in stage.modules() if mod is not stage)


def install_fusions(model: nn.Module) -> nn.Module:
    """Turn every nn.Sequential of quantized BasicBlocks into a FusedStage (in place; modules and state-dict keys
    unchanged). Returns the model."""
    for m in list(model.modules()):
        if type(m) is nn.Sequential and len(m) and all(type(b) is BasicBlock for b in m):
            if all(isinstance(b.conv1, QConv2d) and isinstance(b.conv2, QConv2d) for b in m):
                for b in m:
                    b.__class__ = QuantBasicBlock
                m.__class__ = FusedStage
    return model


def remove_fusions(model: nn.Module) -> None:
    """Back to plain nn.Sequential stages of plain BasicBlocks (the same computation, without the fast path); an
    integer-residual stage (`quant.residual.IntStage`) back to an nn.Sequential of its blocks."""
    for m in model.modules():
        if isinstance(m, FastStage):
            m.__class__ = nn.Sequential
        elif type(m) is QuantBasicBlock:
            m.__class__ = BasicBlock
