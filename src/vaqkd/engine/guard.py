"""The non-finite guard: a diverged run stops at the first non-finite loss or weight, keeps its last good
checkpoint and says where (failed.json, TrainingDiverged)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vaqkd.config import Config
from vaqkd.distill.objective import part_sources
from vaqkd.errors import TrainingDiverged
from vaqkd.rundir import latest_checkpoint, write_json

NONFINITE_CHECK_EVERY = 25  # steps between host-side checks of the on-device non-finite flag


class Guard:
    """The first step whose loss was non-finite, kept on the device (no per-step host sync). Which loss parts
    went non-finite is read from the stretch's running sums of the parts, which keep a NaN or inf once one
    enters: no per-part work per step."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def check(self, part_sums: dict[str, torch.Tensor]) -> tuple[int, list[str]] | None:
        """(first bad step, non-finite parts), or None; one host sync."""
        first = int(self.first)
        if first < 0:
            return None
        return first, [k for k, v in part_sums.items() if not bool(torch.isfinite(v))]


def finite(*modules: nn.Module) -> bool:
    """All parameters finite (one reduction per tensor, one host sync)."""
    sums = [p.detach().float().sum() for m in modules for p in m.parameters()]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def advice(cfg: Config, parts: list[str]) -> str:
    """What to change: the first non-finite loss part (in the objective's order) and the settings that feed it,
    then the learning rates; with no part non-finite (the weights or the total), the learning rates."""
    lrs = f"optim.lr (now {cfg.optim.lr:g})"
    if cfg.quant.enabled:
        lrs += f" or optim.quant_lr_scale (now {cfg.optim.quant_lr_scale:g})"
    sources = part_sources(cfg.distill.terms)
    first = next((p for p in sources if p in parts), None)
    if first is None:
        return f"Lower {lrs}, or check the data"
    i, anchor = sources[first]
    t, key = cfg.distill.terms[i], f"distill.terms.{i}"
    feeds = [f"{key}.weight = {t.weight:g}"] if anchor is None else [
        f"{key}.anchor_weights.{anchor} = {t.anchor_weights[anchor]:g}", f"{key}.anchor_bits.{anchor} = "
        f"{t.anchor_bits[anchor]}"]  # fmt: skip
    feeds += [f"{key}.{k} = {v!r}" for k, v in t.params.items()]
    return f"The first non-finite part is {first} ({t.kind}; fed by {', '.join(feeds)}): check those, lower {lrs}, " \
           "or check the data"  # fmt: skip


def diverged(run_dir: Path, cfg: Config, bad: tuple[int, list[str]], steps_per_epoch: int) -> None:
    step, parts = bad
    ck = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint ({ck.name}) is kept" if ck else "no checkpoint was written before it"
    what = ", ".join(parts) if parts else "the total only"
    msg = (
        f"{run_dir}: training became non-finite at step {step} (epoch {step // steps_per_epoch + 1}; non-finite: "
        f"{what}); {kept}. {advice(cfg, parts)}"
    )
    failed = {"reason": "non-finite loss or weights", "step": step, "parts": parts, "message": msg}
    write_json(run_dir / "failed.json", failed)
    raise TrainingDiverged(msg)
