"""Recompute the `profile` (size, BOPs) of committed records of integer-residual runs made before 2026-12-02's fix:
the layer table counts layers by forward hooks, and the integer-residual block ran conv1 without calling it as a
module, so those records undercounted every block's first conv. The profile depends only on the config (the
model's layers and bits), never on the training, so it is rebuilt from each record's config.toml; the record
keeps a note of what was recomputed and by which commit.

    python scripts/recompute_profiles.py results/residual/int/runs
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch

from vaqkd.config import load_config
from vaqkd.errors import RunFileError
from vaqkd.metrics.size import model_profile
from vaqkd.rundir import build_student, read_json, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a folder of run records, e.g. results/residual/int/runs")
    folder = ap.parse_args().folder
    if not folder.is_dir():
        raise RunFileError(f"{folder}: no such folder")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for final_path in sorted(Path(folder).glob("*/final.json")):
        cfg = load_config(final_path.parent / "config.toml", [("model.init", "")])
        if cfg.quant.residual != "int":
            continue
        final = read_json(final_path)
        model = build_student(cfg, 100, torch.device("cpu"))
        new = model_profile(model, 100, cfg.data.image_size)
        if new != final.get("profile"):
            final["profile_as_recorded"] = final.get("profile")
            final["profile"] = new
            final["profile_recomputed"] = f"{sha}: the layer table had missed conv1 of every integer-residual block"
            write_json(final_path, final)  # whole or not at all
            print(f"{final_path}: size {final['profile_as_recorded']['quant_mib']:.4f} -> {new['quant_mib']:.4f} MiB")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "scripts/recompute_profiles.py"))
