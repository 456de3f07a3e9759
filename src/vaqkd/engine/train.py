"""The training engine: `fit` (a whole run in a run directory), `train_one_epoch`, `evaluate`, `lr_at`.

Run directory: config.toml (resolved), env.json (git SHA, versions, device, seed, threads), metrics.jsonl
(one line per epoch), final.json, and a checkpoint (model/objective .safetensors + state.pt). All training
state is explicit: the data order and augmentation of step k of epoch e depend only on (seed, e, k), the
learning rate is a pure function of the step, so a run resumed from any checkpoint continues the same run.
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
from vaqkd.engine.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from vaqkd.engine.setup import (
    autocast,
    build_data,
    build_teacher,
    environment,
    load_weights,
    resolve_device,
    resolve_precision,
    teacher_channels,
    write_json,
)  # fmt: skip
from vaqkd.models import create_model, stage_channels
from vaqkd.quant import calibrate, quantize, quantizers


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


def build_student(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    model = create_model(cfg.model.arch, num_classes)
    if cfg.model.init:
        load_weights(model, cfg.model.init, cfg.model.arch)
    if cfg.quant.enabled:
        q = cfg.quant
        quantize(model, q.w_bits, q.a_bits, q.weight, q.act, q.per_channel, q.first_last)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


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
    splitting a run into pieces.
    """
    run_dir = Path(run_dir)
    config_text = to_toml(cfg)
    if resume:
        if not has_checkpoint(run_dir):
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
        old = (run_dir / "config.toml").read_text()
        if old != config_text:
            raise ValueError(f"{run_dir}: config differs from the one the run started with; refusing to resume")
    elif has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir}: holds a run already; pass --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_text)

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    env = environment(device, cfg.train.seed, precision)
    write_json(run_dir / "env.json", env)

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
            lines = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["epoch"] <= done]
            metrics.write_text("".join(ln + "\n" for ln in lines))
        log(f"resumed {run_dir} at step {state['step']}/{total_steps}")

    def checkpoint() -> None:
        save_checkpoint(run_dir, model, objective, {**state, "optimizer": opt.state_dict()})

    from vaqkd.metrics.size import model_profile  # local: profile imports the quant package

    profile = model_profile(model, data.num_classes) if cfg.quant.enabled else None
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
        t0 = time.perf_counter()
        seen = 0
        for x, y, idx in data.train.batches(epoch, start):
            lr = lr_at(cfg.optim, state["step"], steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss, parts, correct = train_step(model, teacher, objective, opt, x, y, idx, state["step"], precision)
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
            if not done_epoch and ((every and state["step"] % every == 0) or stop):
                break  # flush accumulators below, checkpoint mid-epoch
        bar.close()
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

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
        "seed": cfg.train.seed,
        "git_sha": env["git_sha"],
    }
    if profile is not None:
        final["profile"] = profile
    write_json(run_dir / "final.json", final)
    return final
