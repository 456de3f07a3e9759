"""Copy a finished FP32 teacher run into the package as the shipped pretrained teacher.

    python scripts/ship_teacher.py runs/teacher_cpu --command "vaqkd train CONFIG ..."

Writes src/vaqkd/pretrained/resnet32_cifar100.safetensors (FP32 weights, BatchNorm statistics included) and a
.json beside it with the recipe (resolved config), final.json, env.json and the command, so `--teacher
pretrained` and `model.init = "pretrained"` start from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from vaqkd.engine.checkpoint import run_weights

DEST = Path(__file__).resolve().parents[1] / "src" / "vaqkd" / "pretrained" / "resnet32_cifar100.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--command", required=True, help="the command that trained the run")
    args = ap.parse_args()
    run = Path(args.run_dir)
    final = json.loads((run / "final.json").read_text())
    state = load_file(str(run_weights(run)))
    if any("_quant." in k for k in state):
        raise SystemExit(f"{run}: a quantized run cannot be the FP32 teacher")
    save_file(state, str(DEST), metadata={"top1": f"{final['top1_last']:.2f}", "git_sha": final["git_sha"]})
    info = {**final, "command": args.command, "config_toml": (run / "config.toml").read_text(),
            "env": json.loads((run / "env.json").read_text()), "bytes": DEST.stat().st_size}  # fmt: skip
    DEST.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"shipped {DEST} ({DEST.stat().st_size / 1e6:.2f} MB), top-1 {final['top1_last']:.2f}%")


if __name__ == "__main__":
    main()
