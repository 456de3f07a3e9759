"""Copy a finished FP32 teacher run into the package as the shipped pretrained teacher.

    python scripts/ship_teacher.py runs/teacher_cpu --name NAME --command "vaqkd train CONFIG ..."

Writes src/vaqkd/pretrained/NAME.safetensors (FP32 weights, BatchNorm statistics included), a .json beside it
with the recipe (resolved config), final.json, env.json and the command, and the run's metrics.jsonl, so
`--teacher pretrained:NAME` and `model.init = "pretrained:NAME"` start from it. NAME resnet32_cifar100 is what
plain "pretrained" means; shipped weights are never replaced (--force to do it anyway): committed run records
name their teacher by that spec, and new weights under an old name would pair them with a teacher they never saw.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from vaqkd.errors import ConfigError, RunFileError
from vaqkd.rundir import NUMBER, read_json, run_weights

FOLDER = Path(__file__).resolve().parents[1] / "src" / "vaqkd" / "pretrained"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--command", required=True, help="the command that trained the run")
    ap.add_argument("--name", required=True, help="file name in src/vaqkd/pretrained, e.g. resnet32_cifar100_e64")
    ap.add_argument("--force", action="store_true", help="replace weights already shipped under NAME")
    args = ap.parse_args()
    run = Path(args.run_dir)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        raise ConfigError(f"--name {args.name}: a plain file name (letters, digits, _ and -), not a path")
    dest = FOLDER / f"{args.name}.safetensors"
    if dest.exists() and not args.force:
        raise RunFileError(f"{dest}: already shipped (records name their teacher by it); choose another --name")
    if not (run / "final.json").exists():
        raise RunFileError(f"{run}: not a finished run (no final.json)")
    final = read_json(run / "final.json", {"top1_last": NUMBER, "git_sha": str})
    state = load_file(str(run_weights(run)))
    if any("_quant." in k for k in state):
        raise RunFileError(f"{run}: a quantized run cannot be the FP32 teacher")
    # everything read before anything is written: a run that lacks a file ships nothing, not half a teacher
    config, env, metrics = (run / "config.toml").read_text(), read_json(run / "env.json"), run / "metrics.jsonl"
    if not metrics.is_file():
        raise RunFileError(f"{metrics}: file missing")
    save_file(state, str(dest), metadata={"top1": f"{final['top1_last']:.2f}", "git_sha": final["git_sha"]})
    info = {**final, "command": args.command, "config_toml": config, "env": env, "bytes": dest.stat().st_size}
    dest.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.copyfile(metrics, dest.with_suffix(".metrics.jsonl"))
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.2f} MB), top-1 {final['top1_last']:.2f}%")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "scripts/ship_teacher.py"))
