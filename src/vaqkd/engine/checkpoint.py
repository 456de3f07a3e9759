"""Checkpoints: weights in safetensors, the rest (optimizer, counters, metric accumulators) in a torch file
that loads with `weights_only=True`. Files are written to a temporary name and renamed, so a run killed
while saving keeps its previous checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _save_module(module: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def save_checkpoint(run_dir: Path, model: nn.Module, objective: nn.Module, state: dict) -> None:
    _save_module(model, run_dir / "model.safetensors")
    _save_module(objective, run_dir / "objective.safetensors")
    tmp = run_dir / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(run_dir / "state.pt")


def load_checkpoint(run_dir: Path, model: nn.Module, objective: nn.Module, device: torch.device) -> dict:
    model.load_state_dict(load_file(str(run_dir / "model.safetensors"), device=str(device)))
    objective.load_state_dict(load_file(str(run_dir / "objective.safetensors"), device=str(device)))
    return torch.load(run_dir / "state.pt", map_location=device, weights_only=True)


def has_checkpoint(run_dir: Path) -> bool:
    return all((run_dir / f).exists() for f in ("model.safetensors", "objective.safetensors", "state.pt"))
