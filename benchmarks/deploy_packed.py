"""Packed artifact vs the fake-quant model it came from: top-1 and logits on the whole test split, and sizes.

    python benchmarks/deploy_packed.py RUN_DIR --data-root ../shared/data/cifar100 --out results/deploy

Exports RUN_DIR (a finished W2A2 run) with `vaqkd.deploy.export_packed`, evaluates the fake-quant model
(rebuilt from the run directory) and the model loaded from the artifact on every test image in fp32, and
counts the images whose logits are bit-identical. Sizes: the artifact's file, and for ResNet-32 under each
first/last policy the file `pack_model` writes, beside the paper's 0.11 MB (every layer at 2 bits).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from vaqkd.cli import output_folder
    from vaqkd.deploy import export_packed, load, pack_model, save_artifact
    from vaqkd.engine.step import evaluate
    from vaqkd.models import create_model
    from vaqkd.quant import quantize
    from vaqkd.rundir import load_run, run_config
    from vaqkd.runner import command_line, meta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data-root")
    ap.add_argument("--out", type=output_folder, default="results/deploy")
    args = ap.parse_args()
    run_config(args.run_dir)  # a run directory: said before --out is made
    args.out.mkdir(parents=True, exist_ok=True)
    artifact = args.out / f"{args.run_dir.name}.vaqkd.safetensors"
    header = export_packed(args.run_dir, artifact, data_root=args.data_root)
    cfg, fake, data = load_run(args.run_dir, torch.device("cpu"), ["train.device=cpu"], data_root=args.data_root)
    packed, _ = load(artifact)
    fake.eval()
    same, n = 0, 0
    with torch.no_grad():
        for x, _, _ in data.test.batches(0):
            a, b = fake(x), packed(x)
            same += int((a == b).all(1).sum())
            n += len(x)
    top1 = {
        "fake_quant": evaluate(fake, data.test, "fp32")["top1"],
        "packed": evaluate(packed, data.test, "fp32")["top1"],
    }
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("same", "8", "fp32"):
            tensors, summary = pack_model(quantize(create_model("resnet32", 100), 2, 2, first_last=policy))
            f = save_artifact(Path(tmp) / f"{policy}.safetensors", tensors, {"format": "vaqkd-packed", "version": 2,
                                                                               **summary})  # fmt: skip
            sizes[policy] = {
                "file_bytes": f.stat().st_size,
                "file_mib": f.stat().st_size / 2**20,
                "codes_bytes": tensors["codes"].numel(),
                "params_bytes": 4 * tensors["params"].numel(),
            }
    res = {
        "run": str(args.run_dir), "run_top1_last": header["top1_last"], "test_images": n,
        "top1": top1, "logits_bit_identical_images": same,
        "artifact": {"path": str(artifact), "bytes": artifact.stat().st_size, "policy": header["quant"]["first_last"]},
        "resnet32_w2a2_sizes": sizes, "paper_mib": 0.11,
        "meta": {**meta("deploy_packed", 1, [], cfg.distill.teacher or "none"), "command": command_line()},
    }  # fmt: skip
    (args.out / "packed.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/deploy_packed.py"))
