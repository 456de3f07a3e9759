"""CIFAR ResNets (He et al. 2016, sec. 4.2): 6n+2 layers, 16/32/64 channels, option-A (zero-padding)
shortcuts, so a shortcut has no weights. One definition serves the FP32 teacher and the quantized student:
`vaqkd.quant.quantize` swaps the convolutions and the classifier in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = stride != 1 or c_in != c_out
        self.pad = c_out - c_in
        self.feeds = ()  # (next block's first conv,) when the model links blocks; a tuple, not a submodule

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        # option A: subsample by 2 and zero-pad the new channels (no parameters)
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        # A quantized conv2 whose input quantizer clamps at zero computes exactly what it would after the
        # ReLU (same values, same gradients), so the ReLU pass is skipped; the block output's ReLU stays,
        # since the shortcut needs it.
        if not getattr(self.conv2, "input_clamps_at_zero", False):
            out = F.relu(out)
        out = self.bn2(self.conv2(out))
        return _relu_into(out, self.shortcut(x), self.feeds)


def _relu_into(a: torch.Tensor, b: torch.Tensor | None, feeds: tuple) -> torch.Tensor:
    """relu(a + b), handed to the quantized conv it feeds (if any) so that the ReLU and the conv's input
    quantizer run as one fused pass."""
    if feeds and hasattr(feeds[0], "take_quantized_input"):
        return feeds[0].take_quantized_input(a, b)
    return F.relu(a if b is None else a + b)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. `forward` -> logits (B, K); `forward_features` -> named stages."""

    stages = ("stem", "layer1", "layer2", "layer3", "embedding")

    def __init__(self, depth: int, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = (16, 32, 64)
        c_in = 16
        layers = []
        for i, w in enumerate(widths):
            blocks = [BasicBlock(c_in if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            c_in = w
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        self.embed_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named stages: stem (B,16,32,32), layer1 (B,16,32,32), layer2 (B,32,16,16), layer3 (B,64,8,8),
        embedding (B,64) and logits (B,K)."""
        blocks = [*self.layer1, *self.layer2, *self.layer3]
        for block, nxt in zip(blocks, blocks[1:] + [None]):
            block.feeds = (nxt.conv1,) if nxt is not None else ()
        stem = _relu_into(self.bn1(self.conv1(x)), None, (blocks[0].conv1,))
        l1 = self.layer1(stem)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        emb = torch.flatten(F.adaptive_avg_pool2d(l3, 1), 1)
        return {"stem": stem, "layer1": l1, "layer2": l2, "layer3": l3, "embedding": emb, "logits": self.fc(emb)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["logits"]
