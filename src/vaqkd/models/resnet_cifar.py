"""CIFAR ResNets (He et al. 2016, sec. 4.2): 6n+2 layers, 16/32/64 channels, option-A (zero-padding)
shortcuts, so a shortcut has no weights. One definition serves the FP32 teacher and the quantized student:
`vaqkd.quant.quantize` swaps the convolutions and the classifier in place, and installs the quantized fast
path of the residual stages (`vaqkd.quant.fusion`); this file knows nothing of quantization.
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

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        # option A: subsample by 2 and zero-pad the new channels (no parameters)
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C, H, W)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


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
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named stages: stem (B,16,32,32), layer1 (B,16,32,32), layer2 (B,32,16,16), layer3 (B,64,8,8),
        embedding (B,64) and logits (B,K)."""
        stem = F.relu(self.bn1(self.conv1(x)))
        l1 = self.layer1(stem)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        emb = torch.flatten(F.adaptive_avg_pool2d(l3, 1), 1)
        return {"stem": stem, "layer1": l1, "layer2": l2, "layer3": l3, "embedding": emb, "logits": self.fc(emb)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["logits"]


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, BatchNorm at γ = 1, β = 0: the CIFAR ResNet/WRN initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
