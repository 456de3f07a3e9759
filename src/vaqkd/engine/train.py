"""The training engine: `fit`, a whole run in a run directory (the step itself and evaluation: engine.step).

Run directory: config.toml (resolved), env.json (git SHA, versions, device, CPU capability, seed, threads; the
environment that started the run, with each resume appended), metrics.jsonl (one line per epoch), final.json,
and the latest checkpoint `ckpt-<step>/` (see `vaqkd.rundir`). All training state is explicit: the data
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
from torch import nn
from tqdm import tqdm

from vaqkd import dist
from vaqkd.config import Config, ConfigError, identity, to_toml
from vaqkd.data.build import Data, build_data
from vaqkd.distill.objective import Objective, build_term, stages_of
from vaqkd.engine.arithmetic import fingerprint
from vaqkd.engine.curves import Curves
from vaqkd.engine.guard import NONFINITE_CHECK_EVERY, Guard, diverged, finite
from vaqkd.engine.setup import build_teacher, environment, resolve_device, resolve_precision
from vaqkd.engine.step import StudentLoss, evaluate, lr_at, make_optimizer, train_step
from vaqkd.errors import RunFileError, TrainingDiverged
from vaqkd.models import stage_channels
from vaqkd.quant import calibrate, set_grad_batch
from vaqkd.rundir import (
    RunLock,
    build_student,
    has_checkpoint,
    load_checkpoint,
    read_json,
    read_jsonl,
    run_machine,
    save_checkpoint,  # fmt: skip
    write_json,
)


def _start_run(cfg: Config, run_dir: Path, resume: bool, arithmetic: str) -> None:
    """Check that run_dir can take this run (fresh, or resumable with the same config on the same arithmetic);
    write config.toml."""
    config_text = to_toml(cfg)
    if resume:
        if not has_checkpoint(run_dir):
            raise RunFileError(f"{run_dir}: no checkpoint to resume from")
        old = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else None
        if old is None or identity(old) != identity(config_text):
            raise RunFileError(f"{run_dir}: config differs from the one the run started with; refusing to resume")
        env = read_json(run_dir / "env.json") if (run_dir / "env.json").exists() else {}
        before = [part.get("arithmetic", "unknown") for part in (env, *env.get("resumes", []))][-1]
        if before != arithmetic:
            msg = f"trained with arithmetic {before}, this code and machine compute {arithmetic} (engine.arithmetic)"
            raise RunFileError(f"{run_dir}: {msg}; refusing to resume: rerun in another --out")
    elif has_checkpoint(run_dir) or (run_dir / "final.json").exists():
        raise FileExistsError(f"{run_dir}: holds a run already; pass --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)
    if not resume:
        (run_dir / "config.toml").write_text(config_text)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def _record_env(run_dir: Path, env: dict, resume: bool, step: int) -> dict:
    """env.json keeps the environment that started the run (its git SHA is the run's); a resume is appended."""
    path = run_dir / "env.json"
    if resume and path.exists():
        first = read_json(path)
        first.setdefault("resumes", []).append({**env, "at_step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_json(path, first)
        return first
    write_json(path, env)
    return env


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
    `engine.curves`). Holds the run directory's lock for the whole run.
    """
    run_dir = Path(run_dir)
    dist.init(resolve_device(cfg.train.device))  # under torchrun: join the job (a no-op otherwise)
    if not dist.is_main():  # rank 0 alone writes the run directory, logs and draws the progress bar
        log, progress = (lambda _: None), False
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir) if dist.is_main() else nullcontext():
        return _fit(cfg, run_dir, resume, log, progress, stop_after_steps, tensorboard)


@dataclass
class Run:
    """Everything a run in progress holds (built by `prepare`)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    data: Data
    model: nn.Module
    teacher: nn.Module | None
    objective: Objective
    student: nn.Module  # StudentLoss(model, objective), under DDP when distributed
    opt: torch.optim.Optimizer
    state: dict  # step, best top-1 and epoch, train seconds, the epoch's accumulators ("acc")
    env: dict
    profile: dict | None
    curves: Curves | None = None  # TensorBoard (rank 0, when asked)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train)

    @property
    def total_steps(self) -> int:
        return self.cfg.optim.epochs * self.steps_per_epoch

    def checkpoint(self) -> None:
        dist.average_bn_stats(self.model)
        if dist.is_main():
            state = {**self.state, "optimizer": self.opt.state_dict()}
            save_checkpoint(self.run_dir, self.model, self.objective, state)


def _fit(cfg: Config, run_dir: Path, resume: bool, log, progress: bool, stop_after_steps: int | None,
         tensorboard: bool = False) -> dict:  # fmt: skip
    run = prepare(cfg, run_dir, resume, log)
    run.curves = Curves(run_dir) if tensorboard and dist.is_main() else None
    try:
        return _loop(run, log, progress, stop_after_steps)
    finally:
        if run.curves is not None:
            run.curves.close()


def _loop(run: Run, log, progress: bool, stop_after_steps: int | None) -> dict:
    while run.state["step"] < run.total_steps:
        stretch = train_stretch(run, progress, stop_after_steps)
        fold_stretch(run, stretch)  # stops here (TrainingDiverged) if the stretch went non-finite
        if run.state["step"] % run.steps_per_epoch:  # mid-epoch: the accumulators travel in the checkpoint
            run.checkpoint()
        else:
            end_epoch(run, log)
        if stop_after_steps is not None and stop_after_steps <= run.state["step"] < run.total_steps:
            log(f"stopped at step {run.state['step']} (checkpointed)")
            return {}
    return finish(run)


def _stage_channels(cfg: Config, model: nn.Module, teacher: nn.Module | None, size: int) -> tuple[dict, dict]:
    """Channels of the stages the terms read, on student and teacher; a stage neither has is a ConfigError."""
    try:
        s_ch = stage_channels(model, stages_of(cfg.distill.terms), size)
        t_ch = stage_channels(teacher or model, stages_of(cfg.distill.terms, teacher=True), size)
        return s_ch, t_ch
    except KeyError as e:
        msg = str(e.args[0])
        for i, t in enumerate(cfg.distill.terms):
            for key, name in t.params.items():  # the parameter that names the missing stage
                if isinstance(name, str) and name and msg.startswith(repr(name)):
                    raise ConfigError(f"distill.terms.{i}.{key}: {msg}") from None
        raise ConfigError(f"distill.terms: {msg}") from None


def prepare(cfg: Config, run_dir: Path, resume: bool, log) -> Run:
    """Data, student, teacher, objective, calibration, optimizer; the checkpoint's state when resuming."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = dist.local_device(resolve_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, device)
    arithmetic = fingerprint(device, precision)  # the same step on a tiny model: what the numbers depend on
    if dist.is_main():
        _start_run(cfg, run_dir, resume, arithmetic)
    dist.barrier()
    torch.manual_seed(cfg.train.seed)
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs GPUs; on CPUs the running statistics are averaged")

    if cfg.data.batch_size % (dist.world() * cfg.train.micro_batches):
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} does not divide into {dist.world()} processes x "
                          f"{cfg.train.micro_batches} micro-batches")  # fmt: skip
    data = build_data(cfg, device, shard=(dist.rank(), dist.world()))
    model = build_student(cfg, data.num_classes, device)
    teacher = build_teacher(cfg, data.num_classes, device)
    image_size = data.train.images.shape[-1]
    s_ch, t_ch = _stage_channels(cfg, model, teacher, image_size)
    terms = [build_term(t, s_ch, t_ch, data.train_labels, cfg.train.seed) for t in cfg.distill.terms]
    objective = Objective(cfg.distill.terms, terms).to(device)
    if cfg.quant.enabled:
        # whole batches on every rank: the same calibration as one process
        calib = (x for (x, _, _), _ in zip(data.train.batches(0, shard=False), range(cfg.quant.calib_batches)))
        calibrate(model, calib)
        set_grad_batch(model, dist.world() * cfg.train.micro_batches)  # shards and micro-batches: whole-batch LSQ
    opt = make_optimizer(cfg.optim, model, objective)

    state = {"step": 0, "best_top1": -1.0, "best_epoch": -1, "train_seconds": 0.0, "acc": {}}
    if resume:
        state = load_checkpoint(run_dir, model, objective, device)
        opt.load_state_dict(state.pop("optimizer"))
        # drop metric lines written after the checkpoint (a kill between the two writes)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and dist.is_main():
            done = state["step"] // len(data.train)
            lines = [json.dumps(r) for r in read_jsonl(metrics) if r["epoch"] <= done]
            metrics.write_text("".join(ln + "\n" for ln in lines))
        log(f"resumed {run_dir} at step {state['step']}/{cfg.optim.epochs * len(data.train)}")
    here = {**environment(device, cfg.train.seed, precision), "world_size": dist.world(), "arithmetic": arithmetic}
    env = dist.broadcast_object(_record_env(run_dir, here, resume, state["step"]) if dist.is_main() else None)

    from vaqkd.metrics.size import model_profile  # local: profile imports the quant package

    profile = model_profile(model, data.num_classes, image_size) if cfg.quant.enabled else None
    model.train()
    objective.train()
    student = StudentLoss(model, objective)
    if dist.active():
        if cfg.train.sync_bn:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids, forward_sync_buffers=False)
    return Run(cfg, run_dir, device, precision, data, model, teacher, objective, student, opt, state, env, profile)


def train_stretch(run: Run, progress: bool, stop_after_steps: int | None) -> dict:
    """Steps from the current one to the end of the epoch, or to the next mid-epoch checkpoint or stop. Sums
    stay on the device (no host sync per step); returns them with the non-finite guard."""
    cfg, state = run.cfg, run.state
    epoch, start = divmod(state["step"], run.steps_per_epoch)
    bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
               disable=not progress, leave=False, mininterval=1.0)  # fmt: skip
    sums = {"loss": torch.zeros((), device=run.device), "correct": torch.zeros((), dtype=torch.long, device=run.device)}
    parts_sum: dict[str, torch.Tensor] = {}
    guard = Guard(run.device)
    t0, seen, lr = time.perf_counter(), 0, 0.0
    for x, y, idx in run.data.train.batches(epoch, start):
        lr = lr_at(cfg.optim, state["step"], run.steps_per_epoch)
        for g in run.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss, parts, correct = train_step(run.student, run.teacher, run.opt, x, y, idx, state["step"], run.precision,
                                          cfg.train.micro_batches)  # fmt: skip
        guard.update(state["step"], loss)
        sums["loss"] += loss * len(y)
        sums["correct"] += correct
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + v * len(y)
        seen += len(y)
        state["step"] += 1
        bar.update(1)
        done_epoch = state["step"] % run.steps_per_epoch == 0
        every = cfg.train.checkpoint_every_steps
        stop = stop_after_steps is not None and state["step"] >= stop_after_steps
        if state["step"] % NONFINITE_CHECK_EVERY == 0 and _any_rank(guard.check(parts_sum) is not None, run.device):
            break
        if not done_epoch and ((every and state["step"] % every == 0) or stop):
            break
    bar.close()
    return {"sums": sums, "parts": parts_sum, "guard": guard, "seen": seen, "seconds": time.perf_counter() - t0,
            "lr": lr}  # fmt: skip


def fold_stretch(run: Run, stretch: dict) -> None:
    """Check the stretch for non-finite values (before anything of it is kept), then fold its sums into the
    epoch's accumulators (one host sync per stretch)."""
    bad = stretch["guard"].check(stretch["parts"])
    if bad is None and not finite(run.model, run.objective):  # the last update overflowed: its loss is unseen yet
        bad = (run.state["step"] - 1, ["weights after the update"])
    if _any_rank(bad is not None, run.device):
        bad = bad or (run.state["step"] - 1, ["on another rank"])
        if dist.is_main():
            diverged(run.run_dir, run.cfg, bad, run.steps_per_epoch)
        raise TrainingDiverged(f"rank {dist.rank()}: training became non-finite at step {bad[0]}")
    sums, parts = stretch["sums"], dict(sorted(stretch["parts"].items()))
    if dist.active():  # the epoch's figures over every rank's shard
        names = list(parts)
        values = [sums["loss"].float(), sums["correct"].float(), *(torch.as_tensor(v).float() for v in parts.values())]
        flat = dist.all_sum(torch.stack(values))
        sums = {"loss": flat[0], "correct": flat[1]}
        parts = dict(zip(names, flat[2:]))
    acc = run.state["acc"] or {"loss": 0.0, "correct": 0, "seen": 0, "parts": {}, "seconds": 0.0}
    acc["loss"] += sums["loss"].item()
    acc["correct"] += int(sums["correct"].item())
    acc["seen"] += stretch["seen"] * dist.world()
    acc["seconds"] += stretch["seconds"]
    acc["lr"] = stretch["lr"]
    for k, v in parts.items():
        acc["parts"][k] = acc["parts"].get(k, 0.0) + float(v)
    run.state["acc"] = acc
    run.state["train_seconds"] += stretch["seconds"]


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
    rows = read_jsonl(run.run_dir / "metrics.jsonl")
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
