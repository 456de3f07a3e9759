"""Model registry: `create_model(name, num_classes)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vaqkd.errors import VaqkdError
from vaqkd.models.features import classifier_path, features, stage_channels
from vaqkd.models.resnet_cifar import CifarResNet
from vaqkd.models.wrn_cifar import WideResNet

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda k: CifarResNet(20, k),
    "resnet32": lambda k: CifarResNet(32, k),
    "resnet56": lambda k: CifarResNet(56, k),
    "wrn_16_2": lambda k: WideResNet(16, 2, k),
    "wrn_40_2": lambda k: WideResNet(40, 2, k),
}


class UnknownModel(VaqkdError, KeyError):
    """A model name that is not in the registry (a KeyError, printed as its message, not its repr)."""

    def __str__(self) -> str:
        return str(self.args[0])


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    if name not in MODELS:
        raise UnknownModel(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name](num_classes)


def count_weights(model: nn.Module) -> int:
    """Conv and linear weights (+ linear biases), excluding BatchNorm: the convention of model-size tables."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return total


__all__ = [
    "MODELS",
    "create_model",
    "count_weights",
    "stage_channels",
    "features",
    "classifier_path",
    "CifarResNet",
    "WideResNet",
]
