"""Building what a run needs from its Config: device, precision, data, models, teacher, objective."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vaqkd
from vaqkd.config import Config, device_name_ok
from vaqkd.errors import ConfigError, user_path
from vaqkd.models import create_model
from vaqkd.rundir import load_weights, run_config, run_model


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """ "auto" (CUDA when there is one), "cpu", "cuda" or "cuda:N"; anything else, or CUDA on a machine without
    it, is a ConfigError naming `key` (the config key or command-line flag the name came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not device_name_ok(name):
        raise ConfigError(f"{key}={name}: must be auto, cpu, cuda or cuda:N")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # native bf16 matmul/conv on the CPU (AVX512-BF16 or AMX)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU that has it, fp32 on CPUs. The CPU default is fp32 because it repeats itself: on an
    Intel CPU with AMX, bf16 at 2 threads gave two different outcomes in 9 identical runs (fp32 at 2 threads 5
    of 5 identical, bf16 at 1 thread 4 of 4); bf16 stays one setting away (`train.precision = "bf16"`), bit-
    repeatable at one thread per run (`vaqkd table --jobs N` runs one thread per cell)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_supported(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_teacher(cfg: Config, num_classes: int, device: torch.device) -> nn.Module | None:
    if not cfg.distill.teacher:
        return None
    run = user_path(cfg.distill.teacher)
    if (run / "config.toml").exists():  # a run directory: rebuild exactly that model, quantized or not
        teacher = run_model(run, run_config(run), num_classes, device)
    else:
        teacher = create_model(cfg.distill.teacher_arch, num_classes)
        load_weights(teacher, cfg.distill.teacher, cfg.distill.teacher_arch, "distill.teacher")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.train.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher


def git_sha() -> str:
    src = Path(vaqkd.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        # modified tracked files make the SHA "-dirty"; results/ (outputs that runs rewrite) does not count
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results"]
        dirty = subprocess.run(status, cwd=src, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed tensor buffers in the process heap instead of handing each back to the OS (glibc only).

    glibc serves blocks above its mmap threshold (128 KiB, raised dynamically) with fresh mappings that
    are unmapped on free, so every step page-faults in its activations anew: 5-12k minor faults per
    ResNet-32 step at batch 128 (measured), about 5 % of a CPU step. Fixed thresholds (mmap 32 MiB, trim 1 GiB) keep
    the memory mapped: the process holds its peak heap instead of shrinking between steps. Called by the
    command line, not on import; VAQKD_MALLOC_TUNE=0 leaves the allocator alone. Returns whether it applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("VAQKD_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


def cpu_capability() -> str:
    """The CPU's vector instruction set as PyTorch dispatches it (e.g. AVX512, AVX2): results are reproducible
    bit for bit only on the same capability, precision and thread count."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_info() -> dict:
    """The CPU's model name and "family F model M" from the first processor of /proc/cpuinfo (x86 Linux; the
    platform's processor string and "unknown" elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip() and fields:  # the first processor's block is enough
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    family, model = fields.get("cpu family"), fields.get("model")
    return {"model name": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_model": f"family {family} model {model}" if family and model else "unknown"}


def environment(device: torch.device, seed: int, precision: str) -> dict:
    cpu = cpu_info()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu["model name"]
    return {
        "git_sha": git_sha(),
        "vaqkd": vaqkd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": dev_name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(),
        # which generation of that name ("AMD EPYC" is Zen 3, 4 and 5 alike): provenance only; runs pair by their
        # arithmetic, which equal fingerprints on two generations share (fp32 on Zen 4 and Zen 5)
        "cpu_model": cpu["cpu_model"],
        "precision": precision,
        "seed": seed,
        "malloc_tuned": _ALLOCATOR_TUNED,
    }
