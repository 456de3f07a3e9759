"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, BMVC 2016): depth 6n+4, widths 16, 16k, 32k, 64k,
pre-activation blocks (BN-ReLU-conv), a 1x1 convolution on the shortcut where the shape changes. The
WRN-40-2 / WRN-16-2 pair is the CIFAR-100 distillation benchmarks' heterogeneous pair (CRD, Tian et al. 2020:
2.26M and 0.70M parameters). `vaqkd.quant.quantize` swaps every conv and the classifier as for the ResNets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.models.resnet_cifar import init_weights


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))  # (B, C_in, H, W), pre-activation
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs. `forward` -> logits (B, K); `forward_features` -> named stages."""

    stages = ("stem", "layer1", "layer2", "layer3", "embedding")

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        c_in, layers = 16, []
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(*[WideBlock(c_in if j == 0 else w, w, 2 if i > 0 and j == 0 else 1)
                                          for j in range(n)]))  # fmt: skip
            c_in = w
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        self.embed_dim = widths[-1]
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """stem (B,16,32,32), layer1 (B,16k,32,32), layer2 (B,32k,16,16), layer3 (B,64k,8,8) (pre-activation
        block outputs), embedding (B,64k) and logits (B,K)."""
        stem = self.conv1(x)
        l1 = self.layer1(stem)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        emb = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(l3)), 1), 1)
        return {"stem": stem, "layer1": l1, "layer2": l2, "layer3": l3, "embedding": emb, "logits": self.fc(emb)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["logits"]
