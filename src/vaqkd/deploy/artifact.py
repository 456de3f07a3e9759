"""The packed artifact: a trained W2A2 student as integer weight codes at their bit width, in one safetensors file.

    vaqkd export RUN_DIR --format packed --out model.vaqkd.safetensors

Contents: two tensors and a JSON header. `codes` (uint8): every quantized layer's weight codes, packed
densely by `pack_codes` (four 2-bit codes per byte), layer after layer, each layer starting on a byte;
`params` (fp32): everything else the model needs as trained (weight steps, activation quantizers' steps or
clipping levels, BatchNorm, the FP32 or 8-bit edge layers), flattened in the model's state order. The header
(metadata "vaqkd") holds the format version, architecture, classes, normalisation, bit policy, source run, its
git SHA and top-1, a hash of the layout (names, shapes, bits) that the loader checks against the model it
rebuilds, and the sha256 of both tensors; the metadata also holds the header's own sha256 (`integrity.py`:
every hash and every header field is checked on load). Two tensors instead of ~200 keep the file within ~2 KiB
of codes + parameters (a per-tensor safetensors index alone would be ~18 KiB, 15 % of a W2A2 ResNet-32).

`load(path)` rebuilds the quantized model with weights ŵ = (code + Qn)·s, which are exactly the fake-quantized
weights of the run (the same fp32 product), so its eval-mode logits equal the fake-quant model's bit for bit.
Supported: LSQ weight quantizers (per-tensor or per-channel) with any activation quantizer; EWGS and DoReFa
weights are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vaqkd.deploy.integrity import FORMAT, TENSORS, VERSION, check_header, seal, verify
from vaqkd.deploy.pack import pack_codes, packed_size, unpack_codes
from vaqkd.errors import RunFileError, VaqkdError


class ExportError(VaqkdError):
    """The run cannot be exported (not quantized, unfinished, an unsupported layer)."""


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from vaqkd.quant import QConv2d, QLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]


def weight_codes(layer: nn.Module) -> tuple[torch.Tensor, int]:
    """(unsigned codes of the layer's quantized weight, Qn): q = clamp(round(w·(1/s)), Qn, Qp), as the forward."""
    from vaqkd.quant import LSQQuantizer

    wq = layer.w_quant
    if not isinstance(wq, LSQQuantizer):
        raise ExportError(f"{type(wq).__name__} weights cannot be packed (LSQ only)")
    s = wq.step.detach().float()
    q = torch.clamp(torch.round(layer.weight.detach().float() * torch.reciprocal(s)), wq.qn, wq.qp)
    return (q - wq.qn).to(torch.int64), wq.qn


def _layout(model: nn.Module) -> tuple[list[tuple[str, int, int, list[int]]], list[tuple[str, list[int]]]]:
    """(quantized layers as (name, bits, Qn, weight shape), other state entries as (key, shape)), in order."""
    from vaqkd.quant import LSQQuantizer

    layers = []
    for name, layer in _quantized_layers(model):
        wq = layer.w_quant
        if not isinstance(wq, LSQQuantizer):
            raise ExportError(f"layer {name}: {type(wq).__name__} weights cannot be packed (LSQ only)")
        layers.append((name, wq.bits, wq.qn, list(layer.weight.shape)))
    if not layers:
        raise ExportError("the model has no quantized layers: nothing to pack")
    packed = {f"{n}.weight" for n, *_ in layers}
    params = [(k, list(v.shape)) for k, v in model.state_dict().items()
              if k not in packed and not k.endswith("num_batches_tracked")]  # fmt: skip
    return layers, params


def _layout_hash(layout) -> str:
    return hashlib.sha1(json.dumps(layout).encode()).hexdigest()[:16]


def pack_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """({"codes", "params"}, layout summary) of a quantized model (see the module docstring)."""
    layout = _layout(model)
    layers, params = layout
    modules = dict(model.named_modules())
    codes = [pack_codes(weight_codes(modules[name])[0], bits) for name, bits, _, _ in layers]
    state = model.state_dict()
    flat = [state[k].detach().float().reshape(-1) for k, _ in params]
    tensors = {"codes": torch.cat(codes), "params": torch.cat(flat)}
    summary = {"layout_sha1": _layout_hash(layout), "packed_layers": len(layers),
               "codes_bytes": tensors["codes"].numel(), "param_count": tensors["params"].numel()}  # fmt: skip
    return tensors, summary


def save_artifact(out: str | Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """Write the file atomically (a temporary name, then a rename): an existing file is never half-replaced.
    The header gets the sha256 of every tensor, and the metadata the sha256 of the header (`integrity.seal`)."""
    from vaqkd.rundir import atomic_write

    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=seal(tensors, header)))


def finished_run(run_dir: str | Path, data_root: str | None = None):
    """(config, model on the CPU, data, final.json) of a finished run, for export."""
    from vaqkd.rundir import load_run, read_json

    run = Path(run_dir)
    if not (run / "final.json").exists():
        raise ExportError(f"{run}: not a finished run (no final.json); finish it first (vaqkd train --resume)")
    cfg, model, data = load_run(run, torch.device("cpu"), ["train.device=cpu"], data_root=data_root)
    return cfg, model, data, read_json(run / "final.json")


def export_packed(run_dir: str | Path, out: str | Path, data_root: str | None = None) -> dict:
    """Write the packed artifact of a finished quantized run to `out` (atomically); returns its header."""
    run = Path(run_dir)
    cfg, model, data, final = finished_run(run, data_root)
    if not cfg.quant.enabled:
        raise ExportError(f"{run}: not a quantized run (quant.enabled = false): nothing to pack")
    try:
        tensors, summary = pack_model(model)
    except ExportError as e:
        raise ExportError(f"{run}: {e}") from None
    header = {
        "format": FORMAT, "version": VERSION, "arch": cfg.model.arch, "num_classes": data.num_classes,
        "dataset": cfg.data.dataset, "image_size": int(data.test.images.shape[-1]),
        "mean": (data.test.mean.flatten() / 255).tolist(), "std": (data.test.std.flatten() / 255).tolist(),
        "quant": {"w_bits": cfg.quant.w_bits, "a_bits": cfg.quant.a_bits, "weight": cfg.quant.weight,
                  "act": cfg.quant.act, "per_channel": cfg.quant.per_channel, "first_last": cfg.quant.first_last,
                  "residual": cfg.quant.residual, "residual_bits": cfg.quant.residual_bits},
        **summary, "source_run": str(run), "git_sha": final.get("git_sha"), "top1_last": final.get("top1_last"),
    }  # fmt: skip
    problem = check_header({**header, "sha256": {k: "0" * 64 for k in TENSORS}})  # as the loader will check it
    if problem:  # e.g. a final.json whose top1_last is not a percentage: never a file the loader refuses
        raise ExportError(f"{run}: would write an artifact its loader refuses ({problem}; from final.json)")
    save_artifact(out, tensors, header)
    return header


def read_header(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a packed artifact after its integrity checks (`integrity.verify`): a damaged, tampered,
    foreign or unknown-version file is a RunFileError naming the file and what is damaged."""
    from vaqkd.rundir import read_safetensors

    tensors, meta = read_safetensors(Path(path))
    return verify(path, tensors, meta), tensors


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the quantized model of a packed artifact (eval mode) and return (model, header)."""
    from vaqkd.models import create_model
    from vaqkd.quant import quantize_student

    header, tensors = read_header(path)
    q = header["quant"]

    def student() -> nn.Module:  # as the run's student was built
        return quantize_student(create_model(header["arch"], header["num_classes"]), q["w_bits"], q["a_bits"],
                                q["weight"], q["act"], q["per_channel"], q["first_last"], q.get("residual", "float"),
                                q.get("residual_bits", 0))  # fmt: skip

    with torch.device("meta"):  # shapes only: a header that names a huge model allocates nothing before the check
        layout = _layout(student())
    if header.get("layout_sha1") != _layout_hash(layout):
        raise RunFileError(f"{path}: its layout does not match {header['arch']} as this vaqkd builds it (tampered?)")
    model = student()
    layers, params = layout
    codes, flat = tensors.get("codes"), tensors.get("params")
    need_codes = sum(packed_size(math.prod(shape), bits) for _, bits, _, shape in layers)
    need_params = sum(math.prod(shape) for _, shape in params)
    if codes is None or codes.dtype != torch.uint8 or codes.numel() != need_codes:
        raise RunFileError(f"{path}: codes missing or of the wrong length (tampered or truncated)")
    if flat is None or flat.numel() != need_params:
        raise RunFileError(f"{path}: params missing or of the wrong length (tampered or truncated)")
    state = model.state_dict()
    offset = 0
    for key, shape in params:
        n = math.prod(shape)
        state[key] = flat[offset : offset + n].view(shape).to(state[key].dtype)
        offset += n
    offset = 0
    for name, bits, qn, shape in layers:
        n, nbytes = math.prod(shape), packed_size(math.prod(shape), bits)
        q = unpack_codes(codes[offset : offset + nbytes], bits, n).view(shape) + qn
        state[f"{name}.weight"] = q.float() * state[f"{name}.w_quant.step"].float()  # the fake-quantized weight
        offset += nbytes
    model.load_state_dict(state)
    return model.to(device).eval(), header
