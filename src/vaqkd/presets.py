"""Presets and the runs they name: a preset (configs/presets/NAME.toml) gives the rows of a table a shared
[student] section and a teacher; `row_config` resolves one row and seed of it, and `config_hash` names the run.
The table (runner) and the benchmarks name runs with `config_hash`, so a benchmark's run is one the table reuses;
`vaqkd train --preset` merges a preset into a config file here (`preset_config`).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path

from vaqkd.config import Config, Override, apply_override, from_dict, identity, load_dict, merge, to_toml, validated
from vaqkd.errors import ConfigError


def configs_dir() -> Path:
    """The project's configs/ folder (beside src/ in a checkout; else ./configs)."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path("configs")


def preset_names() -> list[str]:
    """The presets there are, by name (configs/presets/*.toml)."""
    return sorted(f.stem for f in (configs_dir() / "presets").glob("*.toml"))


def load_preset(name: str) -> dict:
    """A preset by its name (configs/presets/NAME.toml); a path or an unknown name is one line naming the known."""
    if name not in preset_names():
        raise ConfigError(f"--preset {name}: unknown preset; available: {', '.join(preset_names())}")
    return load_dict(configs_dir() / "presets" / f"{name}.toml")


def preset_teacher(preset: dict) -> str:
    """The teacher a preset's students learn from: its `teacher.weights`, else "pretrained"."""
    return preset.get("teacher", {}).get("weights", "pretrained")


def preset_init(preset: dict, teacher: str) -> str:
    """The weights a preset's students start from: its `teacher.init`, else their teacher's."""
    return preset.get("teacher", {}).get("init", teacher)


def row_config(row: str, preset: dict, seed: int, teacher: str, overrides: Sequence[Override]) -> Config:
    """One row and seed of a preset's table: the row's config (configs/cifar100/ROW.toml) with the preset's [student]
    section, the overrides and the seed; its teacher (and `model.init`, where the row starts from weights) set."""
    d = load_dict(configs_dir() / "cifar100" / f"{row}.toml")
    merge(d, copy.deepcopy(preset.get("student", {})))
    for s in [*overrides, f"train.seed={seed}"]:
        apply_override(d, s)
    if d.get("distill", {}).get("teacher"):
        d["distill"]["teacher"] = teacher
    if d.get("model", {}).get("init"):
        d["model"]["init"] = preset_init(preset, teacher)
    return from_dict(Config, d).validate()


def preset_config(path: str | Path, preset: str | None, overrides: Sequence[Override]) -> Config:
    """A config file with a preset's [student] section merged in, then the overrides (an error about a value the
    file or the preset gave names it: `config.validated`)."""
    d = load_dict(path)
    layers = [(str(path), copy.deepcopy(d))]
    if preset:
        student = load_preset(preset).get("student", {})
        merge(d, copy.deepcopy(student))
        layers.append((f"preset {preset}", student))
    for s in overrides:
        apply_override(d, s)
    return validated(d, overrides, layers)


def config_hash(cfg: Config) -> str:
    """A run's identity as 8 hex digits: its resolved config (`config.identity`) and, for a class-folder
    dataset, the folder's content (`data.identity.folder_digest`), so cells on two folders never share a run."""
    text = identity(to_toml(cfg))
    if cfg.data.dataset == "folder":
        from vaqkd.data.build import data_root
        from vaqkd.data.identity import folder_digest

        text += f"# data {folder_digest(data_root(cfg.data))}\n"
    return hashlib.sha1(text.encode()).hexdigest()[:8]
