"""Why the ONNX integer graph disagreed, and what the fine int32 bias grid changed: on the committed W2A2
artifact (results/deploy/qkd_feature-s0-deploy.vaqkd.safetensors) and the real CIFAR-100 test split.

- export now vs the old export (one bias grid per layer: weight multiplier 63 for every channel, input codes
  not spread): prediction agreement of ONNX Runtime's integer graph with PyTorch;
- the diagnosis: the PyTorch model with its BatchNorm shifts rounded onto the old export's int32 grid, against
  the original model and against the old export in ORT;
- a W4A4 ResNet-32 (the shipped teacher's weights, calibrated on 4 training batches, not trained): integer
  graph vs float reference graph, the limit of the grid at wider codes.

    python benchmarks/onnx_bias_grid.py --data-root ../shared/data/cifar100 --out results/deploy
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch

import vaqkd.deploy.onnx_build as builder
import vaqkd.deploy.onnx_export as ox
from vaqkd.cli import output_folder
from vaqkd.data.build import env_data_root
from vaqkd.data.cifar import load_split
from vaqkd.deploy import load
from vaqkd.deploy.artifact import weight_codes
from vaqkd.deploy.onnx_grid import act_step, bn_fold
from vaqkd.quant import QConv2d


def _old_export(fn, *args, **kw):
    """`fn` with the export as it was: weight multiplier m_max for every channel, input codes not spread."""
    saved = builder.bias_multipliers, builder.input_spread  # where the Builder looks them up
    builder.bias_multipliers = lambda shift, unit, m_max: np.full(len(shift), m_max)
    builder.input_spread = lambda q, w: 1
    try:
        return fn(*args, **kw)
    finally:
        builder.bias_multipliers, builder.input_spread = saved


def _snapped_to_old_grid(model):
    """The model with every fused conv's BatchNorm shift rounded onto the old export's int32 grid."""
    m = copy.deepcopy(model)
    for block in [*m.layer1, *m.layer2, *m.layer3]:
        if not isinstance(block.conv2, QConv2d):
            continue
        conv, bn = block.conv1, block.bn1
        scale, shift = bn_fold(bn)
        _, qn = weight_codes(conv)
        m_max = max(127 // max(-qn, conv.w_quant.qp), 1)
        s_w = conv.w_quant.step.detach().double().reshape(-1).numpy() * np.ones(conv.out_channels)
        grid = (act_step(conv.a_quant) * np.abs(s_w * scale) / m_max).astype(np.float32).astype(np.float64)
        with torch.no_grad():
            bn.bias += torch.from_numpy(np.round(shift / grid) * grid - shift).float()
    return m


def _predict_torch(model, x):
    with torch.no_grad():
        return torch.cat([model(b).argmax(1) for b in x.split(500)])


def _predict_ort(proto, x):
    sess = ox.session(proto.SerializeToString())
    return torch.cat([ox.ort_logits(sess, b).argmax(1) for b in x.split(500)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root(), required=env_data_root() is None)  # default: $VAQKD_DATA
    ap.add_argument("--artifact", default="results/deploy/qkd_feature-s0-deploy.vaqkd.safetensors")
    ap.add_argument("--out", type=output_folder, default="results/deploy")
    args = ap.parse_args()
    from vaqkd.runner import meta

    model, header = load(args.artifact)
    model.eval()
    x, y = load_split("cifar100", args.data_root, train=False)
    mean, std = (torch.tensor(header[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (x.float() / 255 - mean) / std

    ref = _predict_torch(model, x)
    snapped = _predict_torch(_snapped_to_old_grid(model).eval(), x)
    now = _predict_ort(ox.build_onnx(model), x)
    old = _predict_ort(_old_export(ox.build_onnx, model), x)
    agree = lambda a, b: float((a == b).float().mean())  # noqa: E731
    w2a2 = {
        "images": len(x),
        "agreement_with_torch": {"export_now": agree(now, ref), "export_old": agree(old, ref)},
        "torch_with_shifts_on_the_old_grid": {"vs_torch": agree(snapped, ref), "vs_export_old": agree(snapped, old)},
        "top1": {"torch": 100 * agree(ref, y), "export_now": 100 * agree(now, y), "export_old": 100 * agree(old, y)},
    }

    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize
    from vaqkd.rundir import load_weights

    torch.manual_seed(0)
    w4 = create_model("resnet32", 100)
    load_weights(w4, "pretrained", "resnet32")
    w4 = quantize(w4, 4, 4, first_last="fp32")
    xtr, _ = load_split("cifar100", args.data_root, train=True)
    calibrate(w4, [(xtr[i * 128 : (i + 1) * 128].float() / 255 - mean) / std for i in range(4)])
    w4.eval()
    xs = x[:2000]
    r4 = _predict_torch(w4, xs)
    ref_graph = ox.session(ox.build_onnx(w4, integer=False).SerializeToString(), optimize=False)
    ref_pred = torch.cat([ox.ort_logits(ref_graph, b).argmax(1) for b in xs.split(500)])
    w4a4 = {"images": len(xs), "integer_graph": agree(_predict_ort(ox.build_onnx(w4), xs), r4),
            "float_reference_graph": agree(ref_pred, r4), "top1_torch": 100 * agree(r4, y[:2000])}  # fmt: skip
    res = {"w2a2_artifact": args.artifact, "w2a2": w2a2, "w4a4_from_teacher_calibrated": w4a4,
           "meta": meta("onnx_bias_grid", 1, [], "pretrained")}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bias_grid.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/onnx_bias_grid.py"))
