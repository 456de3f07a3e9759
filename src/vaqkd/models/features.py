"""Named intermediate tensors from any model, for the feature and contrastive distillation terms.

A stage is named either by an alias the model defines (`forward_features`, as the CIFAR ResNets and WRNs do:
"stem", "layer1", "layer2", "layer3", "embedding") or by a module path (`"layer2"`, `"features.4"`,
`"blocks.3.act"`): that module's output, taken with a forward hook during the ordinary `model(x)`.
"embedding" on a model without the alias is the input of its last `nn.Linear` (the pooled features before
the classifier). So hint, attention transfer and CRD work on a user's model that knows nothing of vaqkd.

>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
>>> f = features(net, torch.zeros(2, 3, 8, 8), ["1", "embedding"])
>>> tuple(f["1"].shape), tuple(f["embedding"].shape), tuple(f["logits"].shape)
((2, 8, 6, 6), (2, 8), (2, 10))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def classifier_path(model: nn.Module) -> str:
    """Module path of the model's last nn.Linear (its classifier)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KeyError(f"{type(model).__name__} has no nn.Linear: name the embedding's module path instead")
    return linears[-1]


def features(model: nn.Module, x: torch.Tensor, stages: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """{"logits": model output, stage: tensor for every requested stage} (plus every alias the model has)."""
    stages = list(dict.fromkeys(stages))
    aliases = getattr(model, "stages", ()) if hasattr(model, "forward_features") else ()
    hooked = [s for s in stages if s not in aliases]
    if not hooked and hasattr(model, "forward_features"):
        return model.forward_features(x)  # the fast path: every stage is an alias
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for s in hooked:
            if s == "embedding":
                fc = modules[classifier_path(model)]
                handles.append(fc.register_forward_pre_hook(lambda m, inp, s=s: captured.__setitem__(s, inp[0])))
            elif s in modules:
                handles.append(modules[s].register_forward_hook(lambda m, i, out, s=s: captured.__setitem__(s, out)))
            else:
                raise KeyError(f"{s!r} is neither a named stage {tuple(aliases)} nor a module path of "
                               f"{type(model).__name__}")  # fmt: skip
        out = model.forward_features(x) if hasattr(model, "forward_features") else {"logits": model(x)}
    finally:
        for h in handles:
            h.remove()
    return {**out, **captured}


def stage_channels(model: nn.Module, stages: Iterable[str] = (), image_size: int = 32) -> dict[str, int]:
    """Channels (dim 1) of each stage, read from a dry run on one image in eval mode."""
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = features(model, torch.zeros(1, 3, image_size, image_size, device=p.device), stages)
    finally:
        model.train(was)
    return {k: v.shape[1] for k, v in feats.items()}
