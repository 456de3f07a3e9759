"""Weights by spec (shipped, a run directory or a file) and the model a run directory holds."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from vaqkd.config import Config, Override, load_config
from vaqkd.data.build import Data, build_data
from vaqkd.errors import RunFileError, user_path
from vaqkd.models import create_model
from vaqkd.quant import quantize_student
from vaqkd.rundir.checkpoint import load_module, load_state, read_safetensors, run_weights

PRETRAINED = {"resnet32": "resnet32_cifar100"}  # what plain "pretrained" means, per architecture


def pretrained_names() -> list[str]:
    """The weights shipped in the package, by the name "pretrained:NAME" selects them with."""
    folder = resources.files("vaqkd") / "pretrained"
    return sorted(f.name.removesuffix(".safetensors") for f in folder.iterdir() if f.name.endswith(".safetensors"))


def resolve_weights(spec: str, arch: str, what: str = "") -> Path:
    """A weights spec -> a .safetensors path: 'pretrained' (the default shipped weights of `arch`),
    'pretrained:NAME' (src/vaqkd/pretrained/NAME.safetensors), a run directory, or a file. `what`: the setting
    that named it (e.g. distill.teacher), said in the error when the weights are not there."""
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
        path = user_path(spec)
        if path.is_dir():
            path = run_weights(path)
    if not path.exists():
        raise FileNotFoundError(f"{what + ' ' if what else ''}{spec}: weights not found ({path})")
    return path


def load_weights(model: nn.Module, spec: str, arch: str, what: str = "") -> None:
    path = resolve_weights(spec, arch, what)
    state, _ = read_safetensors(path)
    missing, unexpected = load_state(model, state, path, False, f"{arch} here")
    # a quantized run's file holds quantizer parameters too; an FP32 model simply ignores them
    unexpected = [k for k in unexpected if "_quant." not in k]
    if missing or unexpected:
        raise RunFileError(f"{path}: does not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def build_student(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model a config trains: created, initialised from `model.init`, quantized, on the device."""
    model = create_model(cfg.model.arch, num_classes)
    if cfg.model.init:
        load_weights(model, cfg.model.init, cfg.model.arch, "model.init")
    if cfg.quant.enabled:
        q = cfg.quant
        quantize_student(model, q.w_bits, q.a_bits, q.weight, q.act, q.per_channel, q.first_last, q.residual,
                         q.residual_bits)
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
    if not Path(run).exists():
        raise RunFileError(f"{run}: no such run directory (or file)")
    if not (run / "config.toml").exists():
        raise RunFileError(f"{run}: not a run directory (no config.toml)")
    return load_config(run / "config.toml", [*overrides, ("model.init", "")])


def run_model(run: Path, cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model of a run directory with its latest weights (quantized or not, as the run trained it)."""
    model = build_student(cfg, num_classes, device)
    load_module(model, run_weights(run), str(device))
    return model
