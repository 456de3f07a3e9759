"""Recompute the `profile` (size, BOPs) of committed records of integer-residual runs made before 2026-12-02's fix:
the layer table counts layers by forward hooks, and the integer-residual block ran conv1 without calling it as a
module, so those records undercounted every block's first conv. The profile depends only on the config (the
model's layers and bits), never on the training, so it is rebuilt from each record's config.toml; the record
keeps a note of what was recomputed and by which commit.

    python scripts/recompute_profiles.py results/residual/int/runs
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from vaqkd.config import load_config
from vaqkd.metrics.size import model_profile
from vaqkd.rundir import build_student


def main(folder: str) -> None:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for final_path in sorted(Path(folder).glob("*/final.json")):
        cfg = load_config(final_path.parent / "config.toml", [("model.init", "")])
        if cfg.quant.residual != "int":
            continue
        final = json.loads(final_path.read_text())
        model = build_student(cfg, 100, torch.device("cpu"))
        new = model_profile(model, 100, cfg.data.image_size)
        if new != final.get("profile"):
            final["profile_as_recorded"] = final.get("profile")
            final["profile"] = new
            final["profile_recomputed"] = f"{sha}: the layer table had missed conv1 of every integer-residual block"
            final_path.write_text(json.dumps(final, indent=2) + "\n")
            print(f"{final_path}: size {final['profile_as_recorded']['quant_mib']:.4f} -> {new['quant_mib']:.4f} MiB")


if __name__ == "__main__":
    main(sys.argv[1])
