"""Building a run from its Config (what `fit` trains): the run directory checked and started, data, student,
teacher, objective, calibration, optimizer, and the state a resume continues from (`prepare` -> `Run`)."""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vaqkd import dist
from vaqkd.config import Config, differences, identity, to_toml
from vaqkd.data.build import Data, build_data, data_root
from vaqkd.distill.objective import Objective, build_term, stages_of
from vaqkd.engine.arithmetic import (
    fingerprint,
    float_conv_fingerprint,
    kernels_fingerprint,
    quantizers_fingerprint,
    residual_fingerprint,
)
from vaqkd.engine.curves import Curves
from vaqkd.engine.setup import build_teacher, environment, resolve_device, resolve_precision
from vaqkd.engine.step import StudentLoss, make_optimizer
from vaqkd.errors import ConfigError, RunFileError, user_path
from vaqkd.metrics.size import model_profile
from vaqkd.models import stage_channels
from vaqkd.quant import calibrate, intconv, set_grad_batch
from vaqkd.rundir import (
    PART_FINGERPRINTS,
    build_student,
    has_checkpoint,
    holds_run,
    latest_checkpoint,
    load_checkpoint,
    read_json,
    read_jsonl,
    save_checkpoint,
    write_json,
)


def check_same_config(config_text: str, run_dir: Path) -> None:
    """A resume continues the run it names: the config must be the one the run started with."""
    old = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else None
    if old is None:
        raise RunFileError(f"{run_dir}: holds no config.toml; refusing to resume")
    if identity(old) != identity(config_text):
        what = differences(identity(old), identity(config_text))
        raise RunFileError(f"{run_dir}: config differs from the one the run started with ({what}, run -> here); "
                           "refusing to resume")  # fmt: skip


def start_run(cfg: Config, run_dir: Path, resume: bool, arithmetic: str, parts: dict[str, str | None] | None = None
              ) -> None:  # fmt: skip
    """Check that run_dir can take this run (fresh, or resumable with the same config on the same arithmetic,
    and the same `rundir.PART_FINGERPRINTS` where the record has them; `parts`: this run's, by key); write
    config.toml."""
    config_text = to_toml(cfg)
    if resume:
        if not has_checkpoint(run_dir):
            raise RunFileError(f"{run_dir}: no checkpoint to resume from")
        check_same_config(config_text, run_dir)
        env = read_json(run_dir / "env.json") if (run_dir / "env.json").exists() else {}
        before = [part.get("arithmetic", "unknown") for part in (env, *env.get("resumes", []))][-1]
        if before != arithmetic:
            msg = f"trained with arithmetic {before}, this code and machine compute {arithmetic} (engine.arithmetic)"
            cpu32 = env.get("device") == "cpu" and env.get("precision") == "fp32" and intconv.enabled()
            hint = ("; it trained with the float32 convolution (before quant.intconv): resume it with "
                    "VAQKD_INT_CONV=0" if cpu32 and float_conv_fingerprint("fp32") == before else "")  # fmt: skip
            raise RunFileError(f"{run_dir}: {msg}; refusing to resume: rerun in another --out{hint}")
        # the last part that recorded each (a resume by code older than the field leaves a gap, not a pass)
        recorded = (env, *env.get("resumes", []))
        for key, now in (parts or {}).items():
            before = ([None] + [p[key] for p in recorded if p.get(key)])[-1]
            if before is not None and now is not None and before != now:
                msg = f"{PART_FINGERPRINTS[key][1]} computed {before}, here {now} (engine.arithmetic)"
                raise RunFileError(f"{run_dir}: {msg}; refusing to resume: rerun in another --out")
    elif holds_run(run_dir):
        raise FileExistsError(f"{run_dir}: holds a run already; pass --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)
    if not resume:
        (run_dir / "config.toml").write_text(config_text)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def record_env(run_dir: Path, env: dict, resume: bool, step: int) -> dict:
    """env.json keeps the environment that started the run (its git SHA is the run's); a resume is appended."""
    path = run_dir / "env.json"
    if resume and path.exists():
        first = read_json(path)
        first.setdefault("resumes", []).append({**env, "at_step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_json(path, first)
        return first
    write_json(path, env)
    return env


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


def stage_channels_of(cfg: Config, model: nn.Module, teacher: nn.Module | None, size: int) -> tuple[dict, dict]:
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
    # and the fused kernels the tiny model is too small for (a quantized run's activation quantizers)
    q, cl = cfg.quant, cfg.train.channels_last
    parts = {"arithmetic_kernels": kernels_fingerprint(device, precision, q.act, cl) if q.enabled else None,
             "arithmetic_residual": residual_fingerprint(device, precision)
             if q.enabled and q.residual == "int" else None,
             "arithmetic_quantizers": quantizers_fingerprint(device, precision, q.weight, q.act, cl)
             if q.enabled else None}  # fmt: skip
    if dist.is_main():
        start_run(cfg, run_dir, resume, arithmetic, parts)
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
    # a run's latest weights as teacher or start are allowed, never silently
    for key, spec, used, role in (("distill.teacher", cfg.distill.teacher, teacher is not None, "teaches"),
                                  ("model.init", cfg.model.init, bool(cfg.model.init), "is the start")):  # fmt: skip
        t_run = user_path(spec) if used and spec and not spec.startswith("pretrained") else None
        ckpt = latest_checkpoint(t_run) if t_run is not None and t_run.is_dir() else None
        if ckpt is not None and not (t_run / "final.json").exists():
            log(f"note: {key} {spec} has not finished (no final.json): its latest checkpoint, {ckpt.name}, {role}")
    image_size = data.train.images.shape[-1]
    s_ch, t_ch = stage_channels_of(cfg, model, teacher, image_size)
    terms = [build_term(t, s_ch, t_ch, data.train_labels, cfg.train.seed) for t in cfg.distill.terms]
    objective = Objective(cfg.distill.terms, terms).to(device)
    if cfg.quant.enabled:
        # whole batches on every rank: the same calibration as one process
        calib = (x for (x, _, _), _ in zip(data.train.batches(0, shard=False), range(cfg.quant.calib_batches)))
        calibrate(model, calib, cfg.quant.weight_init)
        set_grad_batch(model, dist.world() * cfg.train.micro_batches)  # shards and micro-batches: whole-batch LSQ
    opt = make_optimizer(cfg.optim, model, objective, len(data.train))

    state = {"step": 0, "best_top1": -1.0, "best_epoch": -1, "train_seconds": 0.0, "acc": {}}
    if resume:
        state = load_checkpoint(run_dir, model, objective, device)
        opt.load_state_dict(state.pop("optimizer"))
        # drop metric lines written after the checkpoint (a kill between the two writes)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and dist.is_main():
            done = state["step"] // len(data.train)
            lines = [json.dumps(r) for r in read_jsonl(metrics, torn_tail_ok=True, require={"epoch": int})
                     if r["epoch"] <= done]  # fmt: skip
            metrics.write_text("".join(ln + "\n" for ln in lines))
        log(f"resumed {run_dir} at step {state['step']}/{cfg.optim.epochs * len(data.train)}")
    if resume and dist.is_main():
        started = read_json(run_dir / "env.json").get("dataset_digest") if (run_dir / "env.json").exists() else None
        if started is not None and started != data.digest:
            raise RunFileError(f"{run_dir}: the data under {data_root(cfg.data)} is not the data the run started with "
                               f"(content {data.digest}, started on {started}); refusing to resume")  # fmt: skip
    here = {**environment(device, cfg.train.seed, precision), "world_size": dist.world(), "arithmetic": arithmetic,
            **parts, "dataset_digest": data.digest}  # fmt: skip
    env = dist.broadcast_object(record_env(run_dir, here, resume, state["step"]) if dist.is_main() else None)

    profile = model_profile(model, data.num_classes, image_size) if cfg.quant.enabled else None
    model.train()
    objective.train()
    student = StudentLoss(model, objective)
    if dist.active():
        if cfg.train.sync_bn:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids, **_no_forward_buffer_sync())
    return Run(cfg, run_dir, device, precision, data, model, teacher, objective, student, opt, state, env, profile)


def _no_forward_buffer_sync() -> dict:
    """DDP's switch for "do not broadcast buffers at every forward" (BN statistics are averaged over ranks
    instead): `forward_sync_buffers` from torch 2.13, `broadcast_buffers` (deprecated there) before it. The old
    switch also skips the one broadcast when DDP is built; harmless here, since every rank builds the same model
    from the same seed, checkpoint and calibration batches, so the buffers are equal already."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
