"""Checkpoints of a run directory, the checks of what a run folder holds, and the checked safetensors reads every
weights file goes through.

Checkpoints are one atomic unit: a checkpoint is a directory `ckpt-<step>/` holding `model.safetensors`,
`objective.safetensors` (weights, each stamped with the step in its metadata) and `state.pt` (optimizer, counters,
metric accumulators; loads with `weights_only=True`). It is written under a temporary name, flushed to disk and
renamed in one step, and the previous checkpoint is deleted only after that: at every instant the run directory
holds at least one complete checkpoint, and a kill (even inside the save) never pairs weights of one step with
state of another.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vaqkd.errors import RunFileError
from vaqkd.rundir.files import fsync, write_failure

FORMAT = "vaqkd-checkpoint-1"
PREFIX = "ckpt-"
RUN_FILES = ("config.toml", "env.json", "tensorboard", "metrics.jsonl", "final.json", "failed.json", ".lock")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (a temporary one is never named ckpt-<digits>)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def foreign_entries(run_dir: Path) -> list[str]:
    """What a folder holds that no run writes (a run's files, its checkpoints and hidden temporaries aside): a
    fresh run is not started among them (an --out naming a dataset or a project folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir())
    ckpt = [n for n in names if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [n for n in names if n not in RUN_FILES and not n.startswith(".") and n not in ckpt]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def has_checkpoint(run_dir: Path) -> bool:
    return latest_checkpoint(run_dir) is not None


def holds_run(run_dir: Path) -> bool:
    """A run started here: it has a checkpoint or has finished (a fresh start is refused, a resume continues it)."""
    return has_checkpoint(run_dir) or (Path(run_dir) / "final.json").exists()


def run_weights(run_dir: Path) -> Path:
    """model.safetensors of a run's latest checkpoint (the final weights of a finished run)."""
    ck = latest_checkpoint(run_dir)
    if ck is None and not Path(run_dir).exists():
        raise RunFileError(f"{run_dir}: no such run directory")
    if ck is None:
        raise RunFileError(f"{run_dir}: not a run directory with weights (no {PREFIX}<step>/ checkpoint)")
    return ck / "model.safetensors"


def _save_module(module: nn.Module, path: Path, step: int) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "step": str(step)})


def _checkpoint_bytes(run_dir: Path, model: nn.Module, objective: nn.Module) -> int:
    """About what a checkpoint takes: the previous one's size, else the weights twice (optimizer momenta)."""
    prev = latest_checkpoint(run_dir)
    if prev is not None:
        return sum(f.stat().st_size for f in prev.iterdir())
    return 2 * sum(t.numel() * t.element_size() for m in (model, objective) for t in m.state_dict().values())


def save_checkpoint(run_dir: Path, model: nn.Module, objective: nn.Module, state: dict) -> Path:
    run_dir = Path(run_dir)
    step = int(state["step"])
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_module(model, tmp / "model.safetensors", step)
        _save_module(objective, tmp / "objective.safetensors", step)
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
    except BaseException as e:  # a full disk, a kill (Ctrl-C): the temporary goes, the previous checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        err = (
            write_failure(run_dir, e, _checkpoint_bytes(run_dir, model, objective))
            if isinstance(e, Exception)
            else None
        )
        if err is None:
            raise
        raise err from None
    if final.exists():  # the same step saved again: move the old copy aside first (rename, not delete)
        old = run_dir / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync(run_dir)
    for p in checkpoints(run_dir):  # the new one is complete: the older ones can go
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(f".{PREFIX}*"):  # temporaries of killed saves
        shutil.rmtree(p, ignore_errors=True)
    return final


def read_safetensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, truncated or damaged file is a RunFileError."""
    path = Path(path)
    if not path.exists():
        raise RunFileError(f"{path}: file missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError, ... : the message is what the user needs
        raise RunFileError(f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0][:160]})") from None


def load_module(module: nn.Module, path: Path, device: str = "cpu", strict: bool = True) -> dict[str, str]:
    """Load weights into `module`; a file that belongs to another model is a RunFileError. Returns metadata."""
    tensors, meta = read_safetensors(path, device)
    load_state(module, tensors, path, strict, "this model")
    return meta


def load_state(module: nn.Module, state: dict, path: Path, strict: bool, what: str) -> tuple[list[str], list[str]]:
    """`module.load_state_dict`; weights of other shapes (another class count, another width) are a RunFileError
    naming the file and the first mismatch."""
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else str(e)).strip()
        raise RunFileError(f"{path}: does not fit {what} ({first[:200]})") from None


def load_checkpoint(run_dir: Path, model: nn.Module, objective: nn.Module, device: torch.device) -> dict:
    ck = latest_checkpoint(run_dir)
    if ck is None and not Path(run_dir).exists():
        raise RunFileError(f"{run_dir}: no such run directory")
    if ck is None:
        raise RunFileError(f"{run_dir}: no checkpoint to resume from")
    step = int(ck.name[len(PREFIX) :])
    for name, module in (("model.safetensors", model), ("objective.safetensors", objective)):
        meta = load_module(module, ck / name, str(device))
        if meta.get("step") != str(step):
            raise RunFileError(f"{ck / name}: stamped step {meta.get('step')!r}, expected {step} (foreign file)")
    path = ck / "state.pt"
    if not path.exists():
        raise RunFileError(f"{path}: file missing")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RunFileError(f"{path}: damaged or not a checkpoint state ({type(e).__name__})") from None
    held = state.get("step") if isinstance(state, dict) else None
    if held != step:
        raise RunFileError(f"{path}: holds step {held}, expected {step} (foreign file)")
    return state
