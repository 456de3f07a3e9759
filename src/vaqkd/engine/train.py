"""The training engine: `fit` (a whole run in a run directory), `train_one_epoch`, `evaluate`, `lr_at`.

Run directory: config.toml (resolved), env.json (git SHA, versions, device, CPU capability, seed, threads; the
environment that started the run, with each resume appended), metrics.jsonl (one line per epoch), final.json,
and the latest checkpoint `ckpt-<step>/` (see `engine.checkpoint`). All training state is explicit: the data
order and augmentation of step k of epoch e depend only on (seed, e, k), the learning rate is a pure function
of the step, so a run resumed from any checkpoint continues the same run. A run whose loss becomes non-finite
stops (TrainingDiverged) with its last good checkpoint and a `failed.json` saying where.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vaqkd.config import Config, OptimConfig, to_toml
from vaqkd.distill.objective import Objective, build_term
from vaqkd.engine.checkpoint import RunLock, has_checkpoint, load_checkpoint, read_json, read_jsonl, save_checkpoint
from vaqkd.engine.setup import (
    autocast,
    build_data,
    build_student,
    build_teacher,
    environment,
    resolve_device,
    resolve_precision,
    teacher_channels,
    write_json,
)  # fmt: skip
from vaqkd.errors import RunFileError, TrainingDiverged
from vaqkd.models import stage_channels
from vaqkd.quant import calibrate, quantizers

NONFINITE_CHECK_EVERY = 25  # steps between host-side checks of the on-device non-finite flag


def lr_at(cfg: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at global step `step` (linear warm-up, then the schedule, evaluated per step)."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * max(1.0 - progress, 0.0)  # onecycle: warm-up, then linear decay to zero


def make_optimizer(cfg: OptimConfig, model: nn.Module, objective: nn.Module) -> torch.optim.SGD:
    qparams = {id(p) for q in quantizers(model) for p in q.parameters()}
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in qparams], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if id(p) in qparams], "weight_decay": 0.0, "lr_scale": cfg.quant_lr_scale},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: str = "fp32") -> dict[str, float]:
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    loss_sum = torch.zeros((), device=loader.device)
    n = 0
    for x, y, _ in loader.batches(0):
        with autocast(loader.device, precision):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    model.train(was)
    return {"top1": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}


def train_step(model, teacher, objective, opt, x, y, idx, step: int, precision: str):
    """One optimisation step. Returns (loss, parts, correct) as tensors (no host sync)."""
    with autocast(x.device, precision):
        if teacher is not None and objective.uses_teacher:
            with torch.no_grad():
                t = teacher.forward_features(x)
        else:
            t = None
        s = model.forward_features(x)
        loss, parts = objective(s, t, y, index=idx, step=step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), parts, (s["logits"].detach().argmax(1) == y).sum()


class _Guard:
    """Watches the loss and its parts for non-finite values on the device (no per-step host sync): remembers
    the first bad step and which parts went bad; `check()` reads it back (one sync)."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.parts: dict[str, torch.Tensor] = {}

    def update(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        bad = ~torch.isfinite(loss)
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)
        for k, v in parts.items():
            b = ~torch.isfinite(v)
            self.parts[k] = b if k not in self.parts else self.parts[k] | b

    def check(self) -> tuple[int, list[str]] | None:
        first = int(self.first)
        if first < 0:
            return None
        return first, [k for k, b in self.parts.items() if bool(b)]


def _start_run(cfg: Config, run_dir: Path, resume: bool) -> None:
    """Check that run_dir can take this run (fresh, or resumable with the same config); write config.toml."""
    config_text = to_toml(cfg)
    if resume:
        if not has_checkpoint(run_dir):
            raise RunFileError(f"{run_dir}: no checkpoint to resume from")
        old = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else None
        if old != config_text:
            raise RunFileError(f"{run_dir}: config differs from the one the run started with; refusing to resume")
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
) -> dict:
    """Train according to `cfg` in `run_dir`; returns final.json's content.

    `resume`: continue from the checkpoint in run_dir (an error if there is none, or if its config differs).
    `stop_after_steps`: stop (after checkpointing) once this many global steps are done; for tests and for
    splitting a run into pieces. Holds the run directory's lock for the whole run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        return _fit(cfg, run_dir, resume, log, progress, stop_after_steps)


def _fit(cfg: Config, run_dir: Path, resume: bool, log, progress: bool, stop_after_steps: int | None) -> dict:
    _start_run(cfg, run_dir, resume)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)

    data = build_data(cfg, device)
    model = build_student(cfg, data.num_classes, device)
    teacher = build_teacher(cfg, data.num_classes, device)
    s_ch, t_ch = stage_channels(model), teacher_channels(teacher, model)
    terms = [build_term(t, s_ch, t_ch, data.train_labels, cfg.train.seed) for t in cfg.distill.terms]
    objective = Objective(cfg.distill.terms, terms).to(device)
    if cfg.quant.enabled:
        calib = (x for (x, _, _), _ in zip(data.train.batches(0), range(cfg.quant.calib_batches)))
        calibrate(model, calib)
    opt = make_optimizer(cfg.optim, model, objective)

    steps_per_epoch = len(data.train)
    total_steps = cfg.optim.epochs * steps_per_epoch
    state = {"step": 0, "best_top1": -1.0, "best_epoch": -1, "train_seconds": 0.0, "acc": {}}
    if resume:
        state = load_checkpoint(run_dir, model, objective, device)
        opt.load_state_dict(state.pop("optimizer"))
        # drop metric lines written after the checkpoint (a kill between the two writes)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            done = state["step"] // steps_per_epoch
            lines = [json.dumps(r) for r in read_jsonl(metrics) if r["epoch"] <= done]
            metrics.write_text("".join(ln + "\n" for ln in lines))
        log(f"resumed {run_dir} at step {state['step']}/{total_steps}")
    env = _record_env(run_dir, environment(device, cfg.train.seed, precision), resume, state["step"])

    def checkpoint() -> None:
        save_checkpoint(run_dir, model, objective, {**state, "optimizer": opt.state_dict()})

    from vaqkd.metrics.size import model_profile  # local: profile imports the quant package

    image_size = cfg.data.image_size if cfg.data.dataset == "folder" else 32
    profile = model_profile(model, data.num_classes, image_size) if cfg.quant.enabled else None
    model.train()
    objective.train()
    while state["step"] < total_steps:
        epoch, start = divmod(state["step"], steps_per_epoch)
        acc = state["acc"] or {"loss": 0.0, "correct": 0, "seen": 0, "parts": {}, "seconds": 0.0}
        bar = tqdm(
            total=steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            disable=not progress,
            leave=False,
            mininterval=1.0,
        )
        sums = {"loss": torch.zeros((), device=device), "correct": torch.zeros((), dtype=torch.long, device=device)}
        part_sums: dict[str, torch.Tensor] = {}
        guard = _Guard(device)
        t0 = time.perf_counter()
        seen = 0
        for x, y, idx in data.train.batches(epoch, start):
            lr = lr_at(cfg.optim, state["step"], steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss, parts, correct = train_step(model, teacher, objective, opt, x, y, idx, state["step"], precision)
            guard.update(state["step"], loss, parts)
            sums["loss"] += loss * len(y)
            sums["correct"] += correct
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0) + v * len(y)
            seen += len(y)
            state["step"] += 1
            bar.update(1)
            done_epoch = state["step"] % steps_per_epoch == 0
            every = cfg.train.checkpoint_every_steps
            stop = stop_after_steps is not None and state["step"] >= stop_after_steps
            if state["step"] % NONFINITE_CHECK_EVERY == 0 and guard.check():
                break
            if not done_epoch and ((every and state["step"] % every == 0) or stop):
                break  # flush accumulators below, checkpoint mid-epoch
        bar.close()
        bad = guard.check()  # before anything of this stretch is kept
        if bad is None and not _finite(model, objective):  # the last update overflowed: its loss is unseen yet
            bad = (state["step"] - 1, ["weights after the update"])
        if bad is not None:
            _diverged(run_dir, cfg, bad, steps_per_epoch)
        # fold this stretch of steps into the epoch accumulators (host sync once per stretch)
        acc["loss"] += sums["loss"].item()
        acc["correct"] += int(sums["correct"].item())
        acc["seen"] += seen
        acc["seconds"] += time.perf_counter() - t0
        for k, v in part_sums.items():
            acc["parts"][k] = acc["parts"].get(k, 0.0) + float(v)
        state["train_seconds"] += time.perf_counter() - t0
        if state["step"] % steps_per_epoch:  # mid-epoch: keep the accumulators in the checkpoint
            state["acc"] = acc
            checkpoint()
            if stop_after_steps is not None and state["step"] >= stop_after_steps:
                log(f"stopped at step {state['step']} (checkpointed)")
                return {}
            continue
        state["acc"] = {}
        last = epoch + 1 == cfg.optim.epochs
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": acc["loss"] / acc["seen"],
            "train_top1": 100.0 * acc["correct"] / acc["seen"],
            "parts": {k: v / acc["seen"] for k, v in acc["parts"].items()},
            "epoch_seconds": acc["seconds"],
            "img_per_s": acc["seen"] / acc["seconds"],
        }
        if (epoch + 1) % cfg.train.eval_every == 0 or last:
            ev = evaluate(model, data.test, precision)
            row.update(test_top1=ev["top1"], test_loss=ev["loss"])
            if ev["top1"] > state["best_top1"]:
                state["best_top1"], state["best_epoch"] = ev["top1"], epoch + 1
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        test_txt = f" test top-1 {row['test_top1']:.2f}%" if "test_top1" in row else ""
        log(
            f"epoch {epoch + 1}/{cfg.optim.epochs} loss {row['train_loss']:.4f} train top-1 "
            f"{row['train_top1']:.2f}%{test_txt} ({row['epoch_seconds']:.1f}s, {row['img_per_s']:.0f} img/s)"
        )
        checkpoint()
        if stop_after_steps is not None and state["step"] >= stop_after_steps and state["step"] < total_steps:
            log(f"stopped at step {state['step']} (checkpointed)")
            return {}

    rows = read_jsonl(run_dir / "metrics.jsonl")
    final = {
        "name": cfg.name,
        "top1_last": rows[-1]["test_top1"],
        "top1_best": state["best_top1"],
        "best_epoch": state["best_epoch"],
        "epochs": cfg.optim.epochs,
        "train_seconds": state["train_seconds"],
        "train_images": len(data.train_labels),
        "img_per_s": sum(r["img_per_s"] for r in rows) / len(rows),
        "precision": precision,
        "device": env["device_name"],
        "cpu_capability": env.get("cpu_capability", "unknown"),
        "threads": env["threads"],
        "seed": cfg.train.seed,
        "git_sha": env["git_sha"],
    }
    if profile is not None:
        final["profile"] = profile
    write_json(run_dir / "final.json", final)
    return final


def _finite(*modules: nn.Module) -> bool:
    """All parameters finite (one reduction per tensor, one host sync)."""
    sums = [p.detach().float().sum() for m in modules for p in m.parameters()]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def _diverged(run_dir: Path, cfg: Config, bad: tuple[int, list[str]], steps_per_epoch: int) -> None:
    from vaqkd.engine.checkpoint import latest_checkpoint

    step, parts = bad
    ck = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint ({ck.name}) is kept" if ck else "no checkpoint was written before it"
    what = ", ".join(parts) if parts else "the total only"
    msg = (
        f"{run_dir}: training became non-finite at step {step} (epoch {step // steps_per_epoch + 1}; non-finite: "
        f"{what}); {kept}. Lower optim.lr (now {cfg.optim.lr:g}) or check the data"
    )
    failed = {"reason": "non-finite loss or weights", "step": step, "parts": parts, "message": msg}
    write_json(run_dir / "failed.json", failed)
    raise TrainingDiverged(msg)
