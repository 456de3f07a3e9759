"""Building what a run needs from its Config: device, precision, data, models, teacher, objective."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vaqkd
from vaqkd.config import Config, ConfigError, DataConfig, Override, device_name_ok, load_config
from vaqkd.data.cifar import SPECS, load_split
from vaqkd.data.loader import DeviceLoader, subset_per_class
from vaqkd.engine.checkpoint import atomic_write, load_module, read_safetensors, run_weights
from vaqkd.errors import RunFileError
from vaqkd.models import create_model


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


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or os.environ.get("VAQKD_DATA", "data")).expanduser()


@dataclass
class Data:
    train: DeviceLoader
    test: DeviceLoader
    num_classes: int
    train_labels: torch.Tensor  # labels of the (subset) training set, in loader index order


def build_data(cfg: Config, device: torch.device, shard: tuple[int, int] = (0, 1)) -> Data:
    """The run's splits on the device; `shard` = (rank, world): the training loader yields this process's rows
    of every global batch (`data.batch_size`)."""
    d = cfg.data
    root = data_root(d)
    if d.dataset == "folder":
        from vaqkd.data.folder import load_folder_split

        xtr, ytr, classes = load_folder_split(root, True, d.image_size)
        xte, yte, _ = load_folder_split(root, False, d.image_size, classes=classes)
        x = xtr.float() / 255
        mean, std = tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())
        num_classes = len(classes)
    else:
        xtr, ytr = load_split(d.dataset, root, train=True)
        xte, yte = load_split(d.dataset, root, train=False)
        spec = SPECS[d.dataset]
        mean, std, num_classes = spec.mean, spec.std, spec.num_classes
    keep = subset_per_class(ytr, d.subset_per_class)
    xtr, ytr = xtr[keep], ytr[keep]
    keep = subset_per_class(yte, d.test_subset_per_class)
    xte, yte = xte[keep], yte[keep]
    if d.batch_size > len(ytr):
        raise ConfigError(f"data.batch_size: {d.batch_size} is larger than the {len(ytr)} training images")
    cl = cfg.train.channels_last
    train = DeviceLoader(xtr, ytr, d.batch_size, mean, std, device, train=True, seed=cfg.train.seed, channels_last=cl,
                         shard=shard)  # fmt: skip
    test = DeviceLoader(xte, yte, d.eval_batch_size, mean, std, device, train=False, channels_last=cl)
    return Data(train, test, num_classes, ytr)


PRETRAINED = {"resnet32": "resnet32_cifar100"}  # what plain "pretrained" means, per architecture


def pretrained_names() -> list[str]:
    """The weights shipped in the package, by the name "pretrained:NAME" selects them with."""
    folder = resources.files("vaqkd") / "pretrained"
    return sorted(f.name.removesuffix(".safetensors") for f in folder.iterdir() if f.name.endswith(".safetensors"))


def resolve_weights(spec: str, arch: str) -> Path:
    """A weights spec -> a .safetensors path: 'pretrained' (the default shipped weights of `arch`),
    'pretrained:NAME' (src/vaqkd/pretrained/NAME.safetensors), a run directory, or a file."""
    if spec == "pretrained":
        if arch not in PRETRAINED:
            raise FileNotFoundError(f"no pretrained weights ship for {arch!r} (available: {sorted(PRETRAINED)})")
        spec = f"pretrained:{PRETRAINED[arch]}"
    if spec.startswith("pretrained:"):
        name = spec.removeprefix("pretrained:")
        if name not in pretrained_names():
            raise FileNotFoundError(f"{spec!r}: no such shipped weights (available: {pretrained_names()})")
        path = Path(str(resources.files("vaqkd") / "pretrained" / f"{name}.safetensors"))
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            path = run_weights(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    return path


def load_weights(model: nn.Module, spec: str, arch: str) -> None:
    path = resolve_weights(spec, arch)
    state, _ = read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a quantized run's file holds quantizer parameters too; an FP32 model simply ignores them
    unexpected = [k for k in unexpected if "_quant." not in k]
    if missing or unexpected:
        raise RunFileError(f"{path}: does not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def build_student(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model a config trains: created, initialised from `model.init`, quantized, on the device."""
    from vaqkd.quant import quantize

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


def load_run(run_dir: str | Path, device: torch.device, overrides: Sequence[Override] = (),
             data_root: str | Path | None = None) -> tuple[Config, nn.Module, Data]:  # fmt: skip
    """Rebuild a run's model from its directory: (config, model with the latest weights, data).

    `overrides` change the run's config, `data_root` where its dataset is read from; the model is built without
    `model.init` (the run's own weights replace it)."""
    run = Path(run_dir)
    cfg = run_config(run, [*overrides, *([("data.root", str(data_root))] if data_root else [])])
    run_weights(run)  # a run without weights fails here, before the data is loaded
    data = build_data(cfg, device)
    return cfg, run_model(run, cfg, data.num_classes, device), data


def run_config(run: Path, overrides: Sequence[Override] = ()) -> Config:
    """A run directory's config (with `overrides` applied), built without `model.init`: its own weights replace
    it."""
    if not (run / "config.toml").exists():
        raise RunFileError(f"{run}: not a run directory (no config.toml)")
    return load_config(run / "config.toml", [*overrides, ("model.init", "")])


def run_model(run: Path, cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model of a run directory with its latest weights (quantized or not, as the run trained it)."""
    model = build_student(cfg, num_classes, device)
    load_module(model, run_weights(run), str(device))
    return model


def build_teacher(cfg: Config, num_classes: int, device: torch.device) -> nn.Module | None:
    if not cfg.distill.teacher:
        return None
    run = Path(cfg.distill.teacher).expanduser()
    if (run / "config.toml").exists():  # a run directory: rebuild exactly that model, quantized or not
        teacher = run_model(run, run_config(run), num_classes, device)
    else:
        teacher = create_model(cfg.distill.teacher_arch, num_classes)
        load_weights(teacher, cfg.distill.teacher, cfg.distill.teacher_arch)
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


# final.json's machine fields and where env.json holds them
MACHINE_ENV_KEYS = {"device": "device_name", "cpu_capability": "cpu_capability", "precision": "precision",
                    "threads": "threads", "world_size": "world_size", "arithmetic": "arithmetic"}  # fmt: skip


def run_machine(env: dict) -> dict:
    """The machine a run trained on, from its env.json: the start and every resume. A field that changed on a
    resume (a run resumed on another kind of machine) holds each value in order of first use joined by " + "
    (e.g. "Intel(R) Xeon(R) Processor + AMD EPYC"), so the run is of neither kind and pairs only with a run of
    the same sequence. A field env.json lacks (older records) is None."""
    out = {}
    for field, key in MACHINE_ENV_KEYS.items():
        seen = []
        for part in (env, *env.get("resumes", [])):
            if part.get(key) is not None and part[key] not in seen:
                seen.append(part[key])
        out[field] = None if not seen else seen[0] if len(seen) == 1 else " + ".join(map(str, seen))
    return out


def environment(device: torch.device, seed: int, precision: str) -> dict:
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    dev_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
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
        "precision": precision,
        "seed": seed,
        "malloc_tuned": _ALLOCATOR_TUNED,
    }


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))
