"""`quantize(model, ...)`: swap every Conv2d/Linear of a registry model for its quantized version."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vaqkd.quant.layers import QConv2d, QLinear
from vaqkd.quant.quantizers import ACT_QUANTIZERS, WEIGHT_QUANTIZERS, LSQQuantizer, Quantizer, mse_step


def _bits_for(policy: str, body_bits: int) -> int | None:
    """Bits of the first/last layer under a policy: None keeps it FP32."""
    return {"fp32": None, "8": 8, "same": body_bits}[policy]


def quantize(
    model: nn.Module,
    w_bits: int = 2,
    a_bits: int = 2,
    weight: str = "lsq",
    act: str = "lsq",
    per_channel: bool = False,
    first_last: str = "fp32",
) -> nn.Module:
    """Replace layers in place and return the model.

    The first conv sees the normalised image (signed input); every other layer follows a ReLU (unsigned).
    `first_last`: "fp32" keeps the first conv and the last linear in FP32, "8" quantizes them at W8A8,
    "same" at the body's bits (the convention of the paper's size and BOPs columns).
    """
    if first_last not in ("fp32", "8", "same"):
        raise ValueError(f"first_last must be fp32, 8 or same, got {first_last!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layers to quantize")
    edge = {layers[0][0], layers[-1][0]}
    for i, (name, m) in enumerate(layers):
        if isinstance(m, (QConv2d, QLinear)):
            raise ValueError(f"{name} is already quantized")
        wb, ab = (
            (w_bits, a_bits) if name not in edge else (_bits_for(first_last, w_bits), _bits_for(first_last, a_bits))
        )
        if wb is None:
            continue
        signed_input = i == 0
        w_quant = WEIGHT_QUANTIZERS[weight].for_weight(wb, m.weight, per_channel)
        aq = ACT_QUANTIZERS[act]
        if signed_input and not aq.takes_signed:
            aq = ACT_QUANTIZERS["lsq"]  # e.g. PACT clips at zero: the signed image input needs another quantizer
        a_quant = aq(ab, signed_input)
        new = QConv2d(m, w_quant, a_quant) if isinstance(m, nn.Conv2d) else QLinear(m, w_quant, a_quant)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    return model


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], weight_init: str = "lsq") -> int:
    """Data-driven initialisation of every quantizer from a few input batches; returns how many were seen.
    `weight_init="mse"`: then every LSQ weight step is the one that minimises its weights' rounding error
    (`mse_step`, searched from LSQ's initial value) instead of LSQ's 2·mean|w|/√Qp.

    The model runs in training mode, so BatchNorm normalises with each batch's statistics, as it will in the
    first training steps (in eval mode a student trained from scratch would use its initial running statistics,
    mean 0 and variance 1: deep activations grow and the steps come out far too large); the running statistics
    are restored afterwards, so calibration moves nothing but the quantizers."""
    qs = quantizers(model)
    was = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    model.train()
    for q in qs:
        q.calibrating = True
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for q in qs:
            q.calibrating = False
            q.finish_calibration()
        for m, buffers in zip(bns, saved):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        model.train(was)
    if weight_init == "mse":
        for m in model.modules():
            if isinstance(m, (QConv2d, QLinear)) and isinstance(m.w_quant, LSQQuantizer):
                q = m.w_quant
                q.step.data.copy_(mse_step(m.weight, q.step.data, q.qn, q.qp))
    elif weight_init != "lsq":
        raise ValueError(f"weight_init must be lsq or mse, got {weight_init!r}")
    return n


def set_grad_batch(model: nn.Module, factor: int) -> None:
    """The activation quantizers' gradient scale counts `factor` times the batch they see: a rank's shard of
    a global batch, or a micro-batch, gets the step gradient of the whole batch (LSQ: g = 1/sqrt(N·Qp))."""
    for m in model.modules():
        if isinstance(m, (QConv2d, QLinear)):
            m.a_quant.grad_batch = factor
        for q in getattr(m, "act_quantizers", lambda: [])():  # an integer-residual block's stream quantizers
            q.grad_batch = factor


def quantize_student(model: nn.Module, w_bits: int = 2, a_bits: int = 2, weight: str = "lsq", act: str = "lsq",
                     per_channel: bool = False, first_last: str = "fp32", residual: str = "float",
                     residual_bits: int = 0) -> nn.Module:  # fmt: skip
    """`quantize` and the residual policy, as a student is built wherever one is (a run, a packed artifact):
    residual "float" installs the fused fast path of residual stages (`fusion`), "int" the integer residual
    stream (`residual`) of `residual_bits` bits (0: a_bits). Returns the model."""
    from vaqkd.quant.fusion import install_fusions
    from vaqkd.quant.residual import RESIDUAL_MODES, install_int_residual

    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    quantize(model, w_bits, a_bits, weight, act, per_channel, first_last)
    if residual == "int":
        return install_int_residual(model, residual_bits or a_bits)
    return install_fusions(model)  # the same numbers as the plain blocks, fewer passes
