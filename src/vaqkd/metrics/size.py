"""Model size and BOPs as quantization papers count them.

Size: conv/linear weights (+ linear bias) at their weight bit width, BatchNorm excluded; MiB = 2^20 bytes.
BOPs: Σ_layers MACs · b_w · b_a (FP32 layers count 32 · 32). ResNet-32 on CIFAR-100 has 467,732 such
weights: 1.784 MiB in FP32, 0.1115 MiB at 2 bits, and W2A2 in every layer gives 32·32/(2·2) = 256× fewer BOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from vaqkd.models import create_model
from vaqkd.quant import quantize
from vaqkd.quant.quantizers import WEIGHT_QUANTIZERS


def layer_table(model: nn.Module, image_size: int = 32) -> list[dict]:
    """Per conv/linear layer: name, kind, bits, params, MACs (from one dry run on a single image)."""
    rows: list[dict] = []
    hooks = []

    def hook(name: str, m: nn.Module):
        def fn(_, inputs, out):
            w_elems = m.weight.numel()
            per_out = w_elems // m.weight.shape[0]  # MACs per output element
            out_positions = out.numel() // out.shape[1] if isinstance(m, nn.Conv2d) else out.shape[0]
            macs = out_positions * out.shape[1] * per_out if isinstance(m, nn.Conv2d) else w_elems
            params = w_elems + (m.bias.numel() if m.bias is not None else 0)
            rows.append(
                {
                    "name": name,
                    "kind": type(m).__name__,
                    "w_bits": getattr(m, "w_bits", 32),
                    "a_bits": getattr(m, "a_bits", 32),
                    "params": params,
                    "macs": int(macs),
                }
            )

        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name, m)))
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return rows


def summarize(rows: list[dict]) -> dict:
    params = sum(r["params"] for r in rows)
    bops_fp32 = sum(r["macs"] * 32 * 32 for r in rows)
    bops = sum(r["macs"] * r["w_bits"] * r["a_bits"] for r in rows)
    return {
        "params": params,
        "macs": sum(r["macs"] for r in rows),
        "fp32_mib": params * 32 / 8 / 2**20,
        "quant_mib": sum(r["params"] * r["w_bits"] for r in rows) / 8 / 2**20,
        "bops_fp32": bops_fp32,
        "bops": bops,
        "bops_reduction": bops_fp32 / bops,
    }


def model_profile(model: nn.Module, num_classes: int, image_size: int = 32) -> dict:
    """Totals for a (quantized) model on `image_size` inputs, plus the paper's all-layers convention at the
    body's bits."""
    rows = layer_table(model, image_size)
    out = summarize(rows)
    body = max(rows[1:-1], key=lambda r: r["params"]) if len(rows) > 2 else rows[0]
    same = [dict(r, w_bits=body["w_bits"], a_bits=body["a_bits"]) for r in rows]
    paper = summarize(same)
    out["w_bits"], out["a_bits"] = body["w_bits"], body["a_bits"]
    out["paper_quant_mib"] = paper["quant_mib"]
    out["paper_bops_reduction"] = paper["bops_reduction"]
    return out


def profile(arch: str, num_classes: int, w_bits: int, a_bits: int, first_last: str) -> dict:
    """Per-layer bits, params and MACs, size and BOPs. w_bits 32: the FP32 model (activations FP32 too, whatever
    a_bits says: the header reports what the layers are). The counts depend on the bits alone; the model is built
    with the first weight quantizer that trains at `w_bits` (LSQ from 2 bits, DoReFa at 1)."""
    model = create_model(arch, num_classes)
    if w_bits >= 32:
        a_bits = 32
    if w_bits < 32:
        weight = next(k for k, q in WEIGHT_QUANTIZERS.items() if q.min_bits <= w_bits)
        quantize(model, w_bits, a_bits, weight=weight, first_last=first_last)
    rows = layer_table(model)
    return {
        "model": arch,
        "num_classes": num_classes,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "first_last": first_last,
        **summarize(rows),
        "layers": rows,
    }
