"""The training engine: `fit`, a whole run in a run directory (the step itself and evaluation: engine.step).

Run directory: config.toml (resolved), env.json (git SHA, versions, device, CPU capability, seed, threads; the
environment that started the run, with each resume appended), metrics.jsonl (one line per epoch), final.json,
and the latest checkpoint `ckpt-<step>/` (see `vaqkd.rundir.checkpoint`). All training state is explicit: the data
order and augmentation of step k of epoch e depend only on (seed, e, k), the learning rate is a pure function
of the step, so a run resumed from any checkpoint continues the same run. A run whose loss becomes non-finite
stops (TrainingDiverged) with its last good checkpoint and a `failed.json` saying where.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vaqkd import dist
from vaqkd.config import Config, to_toml
from vaqkd.engine.build import Run, check_same_config, prepare
from vaqkd.engine.curves import Curves
from vaqkd.engine.guard import NONFINITE_CHECK_EVERY, Guard, diverged, finite
from vaqkd.engine.setup import resolve_device
from vaqkd.engine.step import evaluate, lr_at, reestimate_bn, train_step
from vaqkd.errors import ConfigError, RunFileError, TrainingDiverged
from vaqkd.rundir import RunLock, foreign_entries, holds_run, read_json, read_jsonl, run_machine, write_json


def fit(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop_after_steps: int | None = None,
    tensorboard: bool = False,
) -> dict:
    """Train according to `cfg` in `run_dir`; returns final.json's content.

    `resume`: continue from the checkpoint in run_dir (an error if there is none, or if its config differs).
    `stop_after_steps`: stop (after checkpointing) once this many global steps are done; for tests and for
    splitting a run into pieces. `tensorboard`: also write each epoch's line as TensorBoard curves (rank 0,
    `engine.curves`). Holds the run directory's lock for the whole run; a start that fails before the first
    checkpoint leaves the directory as it found it (`rundir.RunLock`).
    """
    run_dir = Path(run_dir)
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ConfigError(f"--stop-after-steps {stop_after_steps}: must be >= 1")
    if resume and not run_dir.exists():
        raise RunFileError(f"{run_dir}: no such run directory to resume")
    if not resume and run_dir.exists() and not run_dir.is_dir():
        raise RunFileError(f"{run_dir}: is a file, not a directory (a folder was needed there)")
    # on every rank: none waits for a start that cannot be (a folder holding a run: start_run says so)
    if not resume and not holds_run(run_dir) and (foreign := foreign_entries(run_dir)):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunFileError(f"{run_dir}: not empty and not a run directory (holds {shown}); choose a new or empty --out")
    dist.init(resolve_device(cfg.train.device))  # under torchrun: join the job (a no-op otherwise)
    if not dist.is_main():  # rank 0 alone writes the run directory, logs and draws the progress bar
        log, progress = (lambda _: None), False
    # rank 0 makes the directory; a start that fails before the run holds anything leaves it as it was
    with RunLock(run_dir) if dist.is_main() else nullcontext():
        return _fit(cfg, run_dir, resume, log, progress, stop_after_steps, tensorboard)


def _fit(cfg: Config, run_dir: Path, resume: bool, log, progress: bool, stop_after_steps: int | None,
         tensorboard: bool = False) -> dict:  # fmt: skip
    if resume and (run_dir / "final.json").exists():  # nothing to continue: its result, unchanged
        check_same_config(to_toml(cfg), run_dir)
        log(f"{run_dir}: already finished (final.json); nothing to resume")
        return read_json(run_dir / "final.json")
    run = prepare(cfg, run_dir, resume, log)
    run.curves = Curves(run_dir) if tensorboard and dist.is_main() else None
    try:
        return _loop(run, log, progress, stop_after_steps)
    finally:
        if run.curves is not None:
            run.curves.close()


def _loop(run: Run, log, progress: bool, stop_after_steps: int | None) -> dict:
    while run.state["step"] < run.total_steps:
        if stop_after_steps is not None and stop_after_steps <= run.state["step"]:  # also a resume already there
            log(f"stopped at step {run.state['step']} (checkpointed)")
            return {}
        stretch = train_stretch(run, progress, stop_after_steps)
        fold_stretch(run, stretch)  # stops here (TrainingDiverged) if the stretch went non-finite
        if run.state["step"] % run.steps_per_epoch:  # mid-epoch: the accumulators travel in the checkpoint
            run.checkpoint()
        else:
            end_epoch(run, log)
    return finish(run)


@dataclass
class Stretch:
    """The sums of a stretch of steps, on the device (no host sync per step), and its non-finite guard."""

    loss_sum: torch.Tensor  # Σ loss · batch size
    correct_sum: torch.Tensor  # Σ correct predictions (long)
    part_sums: dict[str, torch.Tensor]  # each loss part: Σ part · batch size
    guard: Guard
    seen: int = 0  # this process's images
    seconds: float = 0.0
    lr: float = 0.0  # the last step's


def train_stretch(run: Run, progress: bool, stop_after_steps: int | None) -> Stretch:
    """Steps from the current one to the end of the epoch, or to the next mid-epoch checkpoint or stop."""
    cfg, state = run.cfg, run.state
    epoch, start = divmod(state["step"], run.steps_per_epoch)
    bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
               disable=not progress, leave=False, mininterval=1.0)  # fmt: skip
    st = Stretch(torch.zeros((), device=run.device), torch.zeros((), dtype=torch.long, device=run.device), {},
                 Guard(run.device))  # fmt: skip
    t0 = time.perf_counter()
    for x, y, idx in run.data.train.batches(epoch, start):
        st.lr = lr_at(cfg.optim, state["step"], run.steps_per_epoch)
        for g in run.opt.param_groups:
            g["lr"] = st.lr * g["lr_scale"]
        loss, parts, correct = train_step(run.student, run.teacher, run.opt, x, y, idx, state["step"], run.precision,
                                          cfg.train.micro_batches)  # fmt: skip
        st.guard.update(state["step"], loss)
        st.loss_sum += loss * len(y)
        st.correct_sum += correct
        for k, v in parts.items():
            st.part_sums[k] = st.part_sums.get(k, 0) + v * len(y)
        st.seen += len(y)
        state["step"] += 1
        bar.update(1)
        done_epoch = state["step"] % run.steps_per_epoch == 0
        every = cfg.train.checkpoint_every_steps
        stop = stop_after_steps is not None and state["step"] >= stop_after_steps
        if state["step"] % NONFINITE_CHECK_EVERY == 0 and _any_rank(st.guard.check(st.part_sums) is not None,
                                                                   run.device):  # fmt: skip
            break
        if not done_epoch and ((every and state["step"] % every == 0) or stop):
            break
    bar.close()
    st.seconds = time.perf_counter() - t0
    return st


def fold_stretch(run: Run, stretch: Stretch) -> None:
    """Check the stretch for non-finite values (before anything of it is kept), then fold its sums into the
    epoch's accumulators, `state["acc"]` (one host sync per stretch; the accumulators travel in a mid-epoch
    checkpoint, hence a plain dict)."""
    bad = stretch.guard.check(stretch.part_sums)
    if bad is None and not finite(run.model, run.objective):  # the last update overflowed: its loss is unseen yet
        bad = (run.state["step"] - 1, ["weights after the update"])
    if _any_rank(bad is not None, run.device):
        bad = bad or (run.state["step"] - 1, ["on another rank"])
        if dist.is_main():
            diverged(run.run_dir, run.cfg, bad, run.steps_per_epoch)
        raise TrainingDiverged(f"rank {dist.rank()}: training became non-finite at step {bad[0]}")
    loss_sum, correct_sum, parts = stretch.loss_sum, stretch.correct_sum, dict(sorted(stretch.part_sums.items()))
    if dist.active():  # the epoch's figures over every rank's shard
        names = list(parts)
        values = [loss_sum.float(), correct_sum.float(), *(torch.as_tensor(v).float() for v in parts.values())]
        flat = dist.all_sum(torch.stack(values))
        loss_sum, correct_sum, parts = flat[0], flat[1], dict(zip(names, flat[2:]))
    acc = run.state["acc"] or {"loss": 0.0, "correct": 0, "seen": 0, "parts": {}, "seconds": 0.0}
    acc["loss"] += loss_sum.item()
    acc["correct"] += int(correct_sum.item())
    acc["seen"] += stretch.seen * dist.world()
    acc["seconds"] += stretch.seconds
    acc["lr"] = stretch.lr
    for k, v in parts.items():
        acc["parts"][k] = acc["parts"].get(k, 0.0) + float(v)
    run.state["acc"] = acc
    run.state["train_seconds"] += stretch.seconds


def end_epoch(run: Run, log) -> None:
    """Evaluate (every `eval_every` epochs and the last), append the epoch's line to metrics.jsonl, log it and
    checkpoint."""
    cfg, state = run.cfg, run.state
    acc, state["acc"] = state["acc"], {}
    epoch = state["step"] // run.steps_per_epoch
    row = {
        "epoch": epoch,
        "lr": acc["lr"],
        "train_loss": acc["loss"] / acc["seen"],
        "train_top1": 100.0 * acc["correct"] / acc["seen"],
        "parts": {k: v / acc["seen"] for k, v in acc["parts"].items()},
        "epoch_seconds": acc["seconds"],
        "img_per_s": acc["seen"] / acc["seconds"],
    }
    if epoch % cfg.train.eval_every == 0 or epoch == cfg.optim.epochs:
        if cfg.train.bn_reestimate_batches:  # on the epoch just trained's first batches
            reestimate_bn(run.model, run.data.train, cfg.train.bn_reestimate_batches, epoch - 1, run.precision)
        dist.average_bn_stats(run.model)
        ev = evaluate(run.model, run.data.test, run.precision)
        row.update(test_top1=ev["top1"], test_loss=ev["loss"])
        if ev["top1"] > state["best_top1"]:
            state["best_top1"], state["best_epoch"] = ev["top1"], epoch
    if dist.is_main():
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if run.curves is not None:
            run.curves.add(row)
    test_txt = f" test top-1 {row['test_top1']:.2f}%" if "test_top1" in row else ""
    log(
        f"epoch {epoch}/{cfg.optim.epochs} loss {row['train_loss']:.4f} train top-1 "
        f"{row['train_top1']:.2f}%{test_txt} ({row['epoch_seconds']:.1f}s, {row['img_per_s']:.0f} img/s)"
    )
    run.checkpoint()


def finish(run: Run) -> dict:
    """final.json from the metrics of every epoch and the run's state (rank 0 writes it; every rank returns it)."""
    if not dist.is_main():
        return dist.broadcast_object(None)
    rows = read_jsonl(run.run_dir / "metrics.jsonl", require={"epoch": int})
    env = run.env
    final = {
        "name": run.cfg.name,
        "top1_last": rows[-1]["test_top1"],
        "top1_best": run.state["best_top1"],
        "best_epoch": run.state["best_epoch"],
        "epochs": run.cfg.optim.epochs,
        "train_seconds": run.state["train_seconds"],
        "train_images": len(run.data.train_labels),
        "img_per_s": sum(r["img_per_s"] for r in rows) / len(rows),
        "precision": run.precision,
        **{k: v for k, v in run_machine(env).items() if v is not None},  # device, capability, ..., every resume's
        "seed": run.cfg.train.seed,
        "git_sha": env["git_sha"],
    }
    if run.profile is not None:
        final["profile"] = run.profile
    write_json(run.run_dir / "final.json", final)
    return dist.broadcast_object(final)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (so all ranks take the same branch). The flag travels on the
    run's device (NCCL reduces CUDA tensors only)."""
    if not dist.active():
        return flag
    return bool(dist.all_sum(torch.tensor(float(flag), device=device)).item())
