"""One run over several processes: torchrun + DistributedDataParallel.

    torchrun --standalone --nproc-per-node 2 -m vaqkd train configs/cifar100/vaqkd_logit.toml ...

`init()` joins the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...): NCCL on
GPUs, gloo on CPUs; without torchrun it is a no-op and everything below degrades to one process. The split of
work, so that the job computes what one process with the same global batch would:

- data: every rank holds the whole (device-resident) split and cuts its shard out of each global batch of the
  same per-epoch order, with the augmentation drawn for the global batch (`DeviceLoader(shard=...)`);
  `data.batch_size` stays the global batch and must divide by the world size;
- gradients: the student and the objective's trainable heads (hint regressors, CRD embeddings) are one
  module under DDP (`engine.step.StudentLoss`); the LSQ activation gradient scale counts the global batch;
- BatchNorm: per-rank batch statistics (SyncBatchNorm with `train.sync_bn = true`, GPUs only); the running
  statistics are averaged over ranks before every evaluation and checkpoint (as timm's `distribute_bn`);
- CRD: negatives are drawn for the global batch and each rank takes its rows; the memory banks are updated
  from the indices and embeddings gathered from every rank, so they stay identical; Z is averaged;
- evaluation: each rank evaluates every world-th test batch and the sums are combined;
- files: rank 0 alone writes the run directory, logs and draws the progress bar; every rank reads a checkpoint
  to resume, at any world size (the step counter and the data order are global).

A rank that fails ends the job: the others fail in their next collective, and torchrun names the rank that
failed first (its "root cause" summary); every rank's error line carries its rank.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as tdist

_ALONE = False  # inside `alone()`: this process computes as if it were the only one


def active() -> bool:
    return not _ALONE and tdist.is_available() and tdist.is_initialized()


@contextlib.contextmanager
def alone():
    """Compute as one process even inside a torchrun job: no collective runs, rank 0 of 1 (the arithmetic
    fingerprint, which must not depend on the world size)."""
    global _ALONE
    was, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = was


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device | None = None) -> bool:
    """Join torchrun's process group (once); returns whether the run is distributed."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and os.environ.get("VAQKD_DIST") != "1":
        return False  # not under torchrun (VAQKD_DIST=1: a group of one, e.g. to test DDP on one GPU)
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get("VAQKD_DIST_TIMEOUT", "1800")))
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return True


def local_device(device: torch.device) -> torch.device:
    """cuda -> this rank's GPU (LOCAL_RANK); a CPU device stays as it is."""
    if device.type == "cuda" and active() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if active():
        tdist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; returns t)."""
    if active():
        tdist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0, in rank order (all ranks pass the same shape)."""
    if not active():
        return t
    out = [torch.empty_like(t) for _ in range(world())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def average_bn_stats(module: torch.nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks (each rank normalised its own shard)."""
    if not active():
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for b in (m.running_mean, m.running_var):
                tdist.all_reduce(b)
                b.div_(world())


def shutdown() -> None:
    if active():
        tdist.destroy_process_group()
