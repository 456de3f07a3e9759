"""One optimisation step and what it is made of: the learning-rate schedule, the optimizer's parameter groups,
the student-with-objective module DDP wraps, the step itself and evaluation. `fit` (engine.train) drives these;
the arithmetic fingerprint (engine.arithmetic) runs the same step on a tiny model."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from vaqkd import dist
from vaqkd.config import OptimConfig
from vaqkd.distill.objective import Objective
from vaqkd.engine.setup import autocast
from vaqkd.models import features
from vaqkd.quant import quantizers


def lr_at(cfg: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at global step `step` (linear warm-up, then the schedule, evaluated per step)."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:  # (a warm-up of a fractional number of steps stops at lr)
        return cfg.lr * min((step + 1) / (cfg.warmup_epochs * steps_per_epoch), 1.0)
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * max(1.0 - progress, 0.0)  # onecycle: warm-up, then linear decay to zero


def make_optimizer(cfg: OptimConfig, model: nn.Module, objective: nn.Module, steps_per_epoch: int = 0
                   ) -> torch.optim.SGD:  # fmt: skip
    """SGD over the student and the objective's heads: the weights (with weight decay), the quantizer parameters
    (none, lr × quant_lr_scale). With `cfg.freeze_weights_epochs` the student's conv/linear weights form a group of
    their own that is held for that many epochs of `steps_per_epoch` steps (`frozen_until`, see `train_step`)."""
    qparams = {id(p) for q in quantizers(model) for p in q.parameters()}
    frozen = set()
    if cfg.freeze_weights_epochs:
        if steps_per_epoch <= 0:
            raise ValueError("make_optimizer: freeze_weights_epochs needs steps_per_epoch")
        frozen = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    special = qparams | frozen
    groups = [
        {"params": [p for p in params if id(p) not in special], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if id(p) in qparams], "weight_decay": 0.0, "lr_scale": cfg.quant_lr_scale},
    ]  # fmt: skip
    if frozen:
        until = round(cfg.freeze_weights_epochs * steps_per_epoch)
        groups.append({"params": [p for p in params if id(p) in frozen], "weight_decay": cfg.weight_decay,
                       "lr_scale": 1.0, "frozen_until": until})  # fmt: skip
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader, batches: int, epoch: int = 0, precision: str = "fp32") -> int:
    """Replace the running statistics of every BatchNorm in `model` by their plain average over the first
    `batches` training batches of `epoch` (forward in training mode, no gradient, nothing else changes); returns
    the number of BatchNorm layers. Low-bit weights that oscillate between grid points leave the running averages
    of training behind the model they end in (Nagel et al., ICML 2022): in results/full_t64 a W2A2 feature-setting
    student read 6-13 points higher with re-estimated statistics mid-training. Under torchrun each rank estimates
    on its own shard and `dist.average_bn_stats` then averages them (the spread between the shards' means is left
    out of the variance: small); with SyncBatchNorm every batch's statistics are global already.
    `train.bn_reestimate_batches` uses the batches of the epoch just trained, `vaqkd eval --bn-reestimate` epoch
    0's: the two need not give the same figure."""
    if batches < 1:
        raise ValueError(f"reestimate_bn: batches must be >= 1, got {batches}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was = model.training
    model.train()
    try:
        for k, (x, _, _) in enumerate(loader.batches(epoch)):
            if k == batches:
                break
            with autocast(loader.device, precision):
                model(x)
    finally:
        model.train(was)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    return len(bns)


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: str = "fp32", combine: bool = True) -> dict[str, float]:
    """Top-1 and mean loss over `loader`. Under torchrun each rank evaluates every world-th batch and the sums are
    combined (`combine=False`: this process evaluates every batch alone)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=loader.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    n = 0
    rank, world = (dist.rank(), dist.world()) if combine else (0, 1)
    for k, (x, y, _) in enumerate(loader.batches(0)):
        if k % world != rank:  # under torchrun each rank evaluates every world-th batch; the sums are combined
            continue
        with autocast(loader.device, precision):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    model.train(was)
    sums = torch.stack([correct, loss_sum, correct.new_tensor(n)])
    correct, loss_sum, n = (dist.all_sum(sums) if combine else sums).tolist()
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n}


class StudentLoss(nn.Module):
    """The student and the objective (with its trainable heads) as one module: the loss of a batch. This is
    what DistributedDataParallel wraps, so the gradients of both are synchronised."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x, t, y, idx, step: int, shard: tuple[int, int]):
        s = features(self.model, x, self.objective.stages)
        loss, parts = self.objective(s, t, y, index=idx, step=step, shard=shard)
        return loss, parts, (s["logits"].detach().argmax(1) == y).sum()


def train_step(student: nn.Module, teacher, opt, x, y, idx, step: int, precision: str, micro: int = 1,
               shard: tuple[int, int] | None = None):  # fmt: skip
    """One optimisation step over this process's shard of the batch, in `micro` micro-batches whose gradients
    add up (under DDP, synchronised after the last). Returns (loss, parts, correct) as tensors (no host sync).
    `student`: a `StudentLoss`, or a DDP wrapper of one. `shard`: (rank, world) of this process (default: the
    process group's; (0, 1) for a step that is this process's alone)."""
    objective = getattr(student, "module", student).objective
    rank, world = shard or (dist.rank(), dist.world())
    opt.zero_grad(set_to_none=True)
    total, parts_sum, correct_sum = 0, {}, 0
    for i, (xc, yc, ic) in enumerate(zip(x.chunk(micro), y.chunk(micro), idx.chunk(micro))):
        # under DDP the gradients are synchronised once, after the last micro-batch
        sync = student.no_sync() if (i < micro - 1 and hasattr(student, "no_sync")) else nullcontext()
        with sync:
            with autocast(x.device, precision):
                if teacher is not None and objective.uses_teacher:
                    with torch.no_grad():
                        t = features(teacher, xc, objective.teacher_stages)
                else:
                    t = None
                loss, parts, correct = student(xc, t, yc, ic, step, (rank * micro + i, world * micro))
            (loss / micro).backward()  # division by 1 is exact: one micro-batch is the plain step, bit for bit
        total = total + loss.detach() / micro
        correct_sum = correct_sum + correct
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + v / micro
    for g in opt.param_groups:  # a held group (freeze_weights_epochs): its gradients (computed, and synchronised
        # under DDP, like any) are dropped here: no update, no momentum, no weight decay
        if step < g.get("frozen_until", 0):
            for p in g["params"]:
                p.grad = None
    opt.step()
    return total, parts_sum, correct_sum
