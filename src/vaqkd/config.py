"""Experiment configuration: frozen dataclasses, a TOML loader, and `--set section.key=value` overrides.

Every field is typed and range-checked; an unknown key, a wrong type or an out-of-range value stops the
program before any work, with an error that names the key. The resolved config is written into every run
directory (`to_toml`), and that file loads back to the same config.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


import tomli_w

from vaqkd.errors import ConfigError, resolved


def _check(key: str, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


COUNT_MAX = 2**31 - 1  # a count beyond this is a typo, and would overflow the tensors it sizes or indexes


def _count(key: str, value: int, lo: int) -> None:
    """A count (epochs, batches, images): an int in [lo, COUNT_MAX]."""
    _check(key, lo <= value <= COUNT_MAX, f"must be in [{lo}, 2^31 - 1], got {value}")


def _check_arch(key: str, arch: str) -> None:
    from vaqkd.models import MODELS

    _check(key, arch in MODELS, f"unknown model {arch!r}; registered: {sorted(MODELS)}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar100"  # cifar100 | cifar10 | folder
    root: str = ""  # "" -> $VAQKD_DATA or ./data
    subset_per_class: int = 0  # first N training images per class (0: all)
    test_subset_per_class: int = 0
    batch_size: int = 64
    eval_batch_size: int = 500
    image_size: int = 32  # folder datasets are resized to this

    def validate(self, p: str) -> None:
        _check(f"{p}.dataset", self.dataset in ("cifar100", "cifar10", "folder"), "must be cifar100, cifar10 or folder")
        _count(f"{p}.subset_per_class", self.subset_per_class, 0)
        _count(f"{p}.test_subset_per_class", self.test_subset_per_class, 0)
        _count(f"{p}.batch_size", self.batch_size, 1)
        _count(f"{p}.eval_batch_size", self.eval_batch_size, 1)
        _check(f"{p}.image_size", 8 <= self.image_size <= 1024, "must be in [8, 1024]")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet32"
    init: str = ""  # weights to start from: a run dir, a .safetensors file, "pretrained" or "pretrained:NAME"

    def validate(self, p: str) -> None:
        _check_arch(f"{p}.arch", self.arch)


@dataclass(frozen=True)
class QuantConfig:
    enabled: bool = False
    w_bits: int = 2
    a_bits: int = 2
    weight: str = "lsq"  # lsq | ewgs | dorefa
    act: str = "lsq"  # lsq | ewgs | pact
    per_channel: bool = False  # weight quantizers only
    first_last: str = "fp32"  # fp32 | 8 | same  (bits of the first conv and the last FC)
    calib_batches: int = 1  # batches for the data-driven initialisation of the quantizers
    # the residual stream: "float" (the paper's: the shortcut carries the unquantized block output) or "int"
    # (codes of `residual_bits` bits between blocks, trained as the integer graph computes: vaqkd.quant.residual)
    residual: str = "float"
    residual_bits: int = 0  # the stream's width; 0: a_bits (the codes the next conv reads)
    # the LSQ weight steps' initial value: "lsq" (2·mean|w|/√Qp, the paper's) or "mse" (the step that minimises the
    # weights' rounding error, searched on a grid: `quant.quantizers.mse_step`)
    weight_init: str = "lsq"

    def validate(self, p: str) -> None:
        from vaqkd.quant.quantizers import ACT_QUANTIZERS, WEIGHT_QUANTIZERS

        _check(f"{p}.w_bits", 1 <= self.w_bits <= 8, "must be in [1, 8]")
        _check(f"{p}.a_bits", 1 <= self.a_bits <= 8, "must be in [1, 8]")
        _check(f"{p}.weight", self.weight in WEIGHT_QUANTIZERS, f"must be one of {sorted(WEIGHT_QUANTIZERS)}")
        _check(f"{p}.act", self.act in ACT_QUANTIZERS, f"must be one of {sorted(ACT_QUANTIZERS)}")
        w_min, a_min = WEIGHT_QUANTIZERS[self.weight].min_bits, ACT_QUANTIZERS[self.act].min_bits
        _check(f"{p}.w_bits", self.w_bits >= w_min, f"{self.weight} needs at least {w_min} bits, got {self.w_bits}")
        _check(f"{p}.a_bits", self.a_bits >= a_min, f"{self.act} needs at least {a_min} bits, got {self.a_bits}")
        _check(f"{p}.per_channel", not self.per_channel or self.weight == "lsq", "per-channel steps exist for lsq only")
        _check(f"{p}.first_last", self.first_last in ("fp32", "8", "same"), "must be fp32, 8 or same")
        _count(f"{p}.calib_batches", self.calib_batches, 1)
        from vaqkd.quant.residual import RESIDUAL_MODES

        _check(f"{p}.residual", self.residual in RESIDUAL_MODES, "must be float or int")
        _check(f"{p}.residual_bits", self.residual_bits in (0, 2, 4, 8), "must be 0 (a_bits), 2, 4 or 8")
        _check(f"{p}.weight_init", self.weight_init in ("lsq", "mse"), "must be lsq or mse")
        _check(f"{p}.weight_init", self.weight_init == "lsq" or self.weight == "lsq", "mse initialises lsq steps only")
        if self.residual == "int":
            _check(f"{p}.residual_bits", self.residual_bits in (0, self.a_bits) or self.residual_bits > self.a_bits,
                   f"must be >= a_bits ({self.a_bits}): the stream carries the convs' input codes")
            _check(f"{p}.act", self.act == "lsq", "an integer residual stream needs lsq activations")


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 240
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine | onecycle
    milestones: tuple[int, ...] = (150, 180, 210)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    quant_lr_scale: float = 1.0  # lr multiplier for quantizer parameters (step sizes, clips)
    # a first phase that holds the conv/linear weights: only quantizer steps, BatchNorm and biases train for this
    # many epochs (the weights' gradients are dropped: no update, no momentum), so a pretrained start is not pushed
    # by the large gradients of its freshly quantized self (measured, seed 0 only: 2.1 points worse from the
    # 64-epoch start at the quick scale, results/strong_start; kept as a knob, off by default)
    freeze_weights_epochs: float = 0.0

    def validate(self, p: str) -> None:
        _count(f"{p}.epochs", self.epochs, 1)
        _check(f"{p}.lr", self.lr > 0, "must be > 0")
        _check(f"{p}.momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        _check(f"{p}.weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check(
            f"{p}.schedule",
            self.schedule in ("multistep", "cosine", "onecycle"),
            "must be multistep, cosine or onecycle",
        )
        _check(f"{p}.gamma", 0 < self.gamma <= 1, "must be in (0, 1]")
        _check(f"{p}.warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "must be in [0, epochs)")
        _check(f"{p}.milestones", list(self.milestones) == sorted(self.milestones), "must be increasing")
        _check(f"{p}.milestones", all(m > 0 for m in self.milestones), "must be epochs > 0")
        _check(f"{p}.quant_lr_scale", self.quant_lr_scale > 0, "must be > 0")
        _check(f"{p}.freeze_weights_epochs", 0 <= self.freeze_weights_epochs < self.epochs, "must be in [0, epochs)")


# The keys a resolved term table held before each term declared its own parameters, in their order and with their
# defaults. The run identity renders every term with all of them (and a term's own further parameters after), so
# records made then keep their hashes; loading such a record drops those that are not the term's own and sit at
# their defaults (a non-default value there was never read, and is refused as not a parameter of that term).
LEGACY_TERM_KEYS: dict[str, Any] = {
    "kind": "ce", "weight": 1.0, "temperature": 4.0, "stage": "layer2", "teacher_stage": "", "feat_dim": 128,
    "nce_k": 16384, "nce_t": 0.07, "nce_momentum": 0.5, "anchor_bits": [], "anchor_weights": [],
    "anchor_mode": "minmax",
}  # fmt: skip


@dataclass(frozen=True)
class TermConfig:
    """One weighted loss term: its kind, weight and virtual anchors (`anchor_bits`/`anchor_weights` add anchor
    copies of it), and the term's own parameters (`params`), which its class in `vaqkd.distill` declares with
    types, ranges and defaults. In TOML a term is one table: `{kind = "kd", weight = 0.9, temperature = 4.0}`."""

    kind: str = "ce"  # a registered loss term (vaqkd.distill.TERMS)
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)  # the term's own, e.g. {"temperature": 4.0}
    anchor_bits: tuple[int, ...] = ()
    anchor_weights: tuple[float, ...] = ()
    anchor_mode: str = "minmax"  # minmax (per sample, asymmetric) | absmax (per sample, symmetric) | tensor

    def validate(self, p: str) -> None:
        from vaqkd.distill.objective import term_class, term_params  # the registry lives with the terms

        cls = term_class(self.kind, f"{p}.kind")
        term_params(self.kind, self.params, p)
        _check(f"{p}.weight", self.weight >= 0, "must be >= 0")
        _check(
            f"{p}.anchor_weights",
            len(self.anchor_weights) == len(self.anchor_bits),
            "needs one weight per anchor bit width",
        )
        _check(f"{p}.anchor_weights", all(w >= 0 for w in self.anchor_weights), "must be >= 0")
        _check(f"{p}.anchor_bits", all(1 <= b <= 16 for b in self.anchor_bits), "bit widths must be in [1, 16]")
        _check(
            f"{p}.anchor_mode", self.anchor_mode in ("minmax", "absmax", "tensor"), "must be minmax, absmax or tensor"
        )
        _check(f"{p}.anchor_bits", not self.anchor_bits or cls.uses_teacher, f"{self.kind} has no teacher to anchor")


def _term_from_table(d: dict, prefix: str) -> TermConfig:
    """A term table: the keys of TermConfig, the rest the term's own parameters (checked against its class)."""
    from vaqkd.distill.objective import term_class, term_params

    common = {f.name for f in dataclasses.fields(TermConfig)} - {"params"}
    t = from_dict(TermConfig, {k: v for k, v in d.items() if k in common}, prefix, plain=True)
    own = term_class(t.kind, f"{prefix}.kind").params
    given = {k: v for k, v in d.items() if k not in common and (k in own or LEGACY_TERM_KEYS.get(k, ...) != v)}
    return dataclasses.replace(t, params=term_params(t.kind, given, prefix))


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # "" (no distillation), a run dir, a .safetensors file, "pretrained" or "pretrained:NAME"
    teacher_arch: str = "resnet32"
    terms: tuple[TermConfig, ...] = (TermConfig(),)

    def validate(self, p: str) -> None:
        _check_arch(f"{p}.teacher_arch", self.teacher_arch)
        _check(f"{p}.terms", len(self.terms) >= 1, "needs at least one term")
        for i, t in enumerate(self.terms):
            t.validate(f"{p}.terms.{i}")
        from vaqkd.distill.registry import TERMS

        needs_teacher = any(TERMS[t.kind].uses_teacher for t in self.terms)
        _check(f"{p}.teacher", bool(self.teacher) or not needs_teacher, "distillation terms need a teacher")


def device_name_ok(name: str) -> bool:
    """The device names a config or flag may give: auto, cpu, cuda or cuda:N (whether the machine has it is
    checked when the device is resolved)."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPUs that have it, fp32 on CPUs) | fp32 | bf16
    channels_last: bool = False
    eval_every: int = 1
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    threads: int = 0  # CPU threads (0: torch default)
    micro_batches: int = 1  # gradient accumulation: each step's batch in this many parts (per process)
    sync_bn: bool = False  # SyncBatchNorm across the processes of a torchrun job (GPUs only)
    # before each evaluation, the student's BatchNorm running statistics re-estimated over this many training
    # batches (`engine.step.reestimate_bn`); 0: the running averages training left (the paper's protocol).
    # Changes what is evaluated and saved, never a training step
    bn_reestimate_batches: int = 0

    def validate(self, p: str) -> None:
        _check(f"{p}.seed", 0 <= self.seed < 2**32, "must be in [0, 2^32)")
        _check(f"{p}.precision", self.precision in ("auto", "fp32", "bf16"), "must be auto, fp32 or bf16")
        _check(
            f"{p}.device",
            device_name_ok(self.device),
            "must be auto, cpu, cuda or cuda:N",
        )
        _count(f"{p}.eval_every", self.eval_every, 1)
        _count(f"{p}.checkpoint_every_steps", self.checkpoint_every_steps, 0)
        _check(f"{p}.threads", 0 <= self.threads <= 4096, "must be in [0, 4096] (0: torch's default)")
        _count(f"{p}.micro_batches", self.micro_batches, 1)
        _count(f"{p}.bn_reestimate_batches", self.bn_reestimate_batches, 0)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        # the run directory is runs/<name>: a name that is empty, a path or '..' would put it elsewhere
        plain = (self.name.strip() and self.name not in (".", "..")
                 and not any(c in self.name for c in "/\\\0") and self.name.isprintable())  # fmt: skip
        _check("name", bool(plain),
               f"must be a plain folder name (no '/', '\\', '..' or control characters), got {self.name!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)
        return self


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass with strict checking


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(key, isinstance(value, dict), f"expected a table, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        _check(key, isinstance(value, (list, tuple)), f"expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{key}.{i}", inner, v) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported type {tp}")
    if tp is float:  # inf and nan are refused everywhere: no setting means anything at either
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(key, number, f"expected a number, got {value!r}")
        _check(key, math.isfinite(value), f"expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        _check(key, isinstance(value, int) and not isinstance(value, bool), f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(key, isinstance(value, bool), f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # e.g. first_last = 8
        _check(key, isinstance(value, str), f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {tp}")


def from_dict(cls: type, d: dict, prefix: str = "", plain: bool = False) -> Any:
    """A dataclass from a table, every key checked (`plain`: a TermConfig's own keys only, not its params)."""
    if cls is TermConfig and not plain:
        return _term_from_table(d, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{k}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(f"{prefix + '.' if prefix else ''}{k}", hints[k], v) for k, v in d.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A config as plain tables; a term's own parameters sit in its table beside kind and weight."""
    if isinstance(obj, TermConfig):
        d = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"kind": d.pop("kind"), "weight": d.pop("weight"), **d.pop("params"), **d}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


# An override is `"section.key=value"` as `--set` gives it (the value in TOML syntax; a bare word is a string) or a
# `(key, value)` pair holding the Python value itself — what the library passes (a path is never pasted into TOML).
Override = str | tuple[str, Any]


def override_key(override: Override) -> str:
    return override[0] if isinstance(override, tuple) else override.partition("=")[0].strip()


def apply_override(d: dict, override: Override) -> None:
    """Apply one override to a config table (list items addressed by index: `distill.terms.1.weight=0.9`)."""
    if isinstance(override, tuple):
        path, value = override
    else:
        path, eq, text = override.partition("=")
        if not eq:
            raise ConfigError(f"{override!r}: an override must look like section.key=value")
        value = _parse_value(text.strip())
    keys = path.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"{override!r}: an override must look like section.key=value")
    node: Any = d
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            _check(path, k.isdigit() and int(k) < len(node), f"no list item {k!r}")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
            _check(".".join(keys[: i + 1]), isinstance(node, (dict, list)), "is a value, not a table")
    last = keys[-1]
    if isinstance(node, list):
        _check(path, last.isdigit() and int(last) < len(node), f"no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def load_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a table; `base = "other.toml"` (relative to the file) names a file whose keys it refines."""
    path = Path(path)
    if resolved(path) in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved(path)))
        raise ConfigError(f"{path}: base files form a loop ({chain})")
    try:
        with open(path, "rb") as f:
            d = tomllib.loads(f.read().decode("utf-8").removeprefix("\ufeff"))  # an editor's byte-order mark
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    for f in dataclasses.fields(Config):  # a section written as [[data]] (a list) or `data = 1`: said as such
        if f.name in d and f.name != "name" and not isinstance(d[f.name], dict):
            raise ConfigError(f"{path}: [{f.name}] must be a table, got a {type(d[f.name]).__name__}")
    base = d.pop("base", None)
    if base is not None:  # a preset names the file it refines: its keys override the base's
        _check(f"{path}: base", isinstance(base, str) and bool(base), f"must name a file, got {base!r}")
        parent = load_dict(path.parent / base, (*_seen, resolved(path)))
        merge(parent, d)
        d = parent
    return d


def merge(into: dict, new: dict) -> None:
    """Merge `new` into `into` recursively (tables merge, values replace)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def load_config(path: str | Path | None = None, overrides: Sequence[Override] = ()) -> Config:
    """A config file (or the defaults) with the overrides applied, checked (`validated`: an error about a value
    the file gave names the file)."""
    d = load_dict(path) if path else {}
    layers = [(str(path), copy.deepcopy(d))] if path else []
    for o in overrides:
        apply_override(d, o)
    return validated(d, overrides, layers)


def _sets(table: dict, key: str) -> bool:
    """Whether a config table (as read, lists of terms included) holds the dotted `key`."""
    node: Any = table
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def validated(d: dict, overrides: Sequence[Override] = (), layers: Sequence[tuple[str, dict]] = ()) -> Config:
    """`from_dict(Config, d).validate()`. An error about a key no override set, whose value one of `layers`
    ((name, its table as read): a config file, a preset's [student] section) gave, names the last such layer —
    the key whose value is refused; a range that depends on another key (warmup_epochs < epochs) is said of it."""
    try:
        return from_dict(Config, d).validate()
    except ConfigError as e:
        key = str(e).partition(":")[0]
        overridden = any(key == k or key.startswith(k + ".") for k in map(override_key, overrides))
        where = next((name for name, table in reversed(layers) if _sets(table, key)), None)
        if where and not overridden:
            raise ConfigError(f"{where}: {e}") from None
        raise


def _canonical_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_canonical_value(x) for x in v) + "]"
    return repr(v)


def canonical_text(d: dict) -> str:
    """A resolved config's table as the text its identity is hashed from: one `key = value` line per key, lists on
    one line, every term with every legacy key (LEGACY_TERM_KEYS) — byte for byte the text runs were written as
    (and hashed from) before config files were written with tomli-w, whose arrays span several lines."""
    d = dict(d)
    lines = [f"name = {_canonical_value(d.pop('name'))}"]
    for section, body in d.items():
        body = dict(body)
        terms = body.pop("terms", None)
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_canonical_value(v)}" for k, v in body.items()]
        for t in terms or []:
            lines.append(f"\n[[{section}.terms]]")
            lines += [f"{k} = {_canonical_value(v)}" for k, v in {**LEGACY_TERM_KEYS, **t}.items()]
    return "\n".join(lines) + "\n"


# Fields added after runs were recorded: while at their default they are left out of a run's identity (its
# config hash, the resume check), so records and run directories made before the field existed still match.
LATER_DEFAULTS = ('teacher_stage = ""', "micro_batches = 1", "sync_bn = false", 'residual = "float"',
                  "residual_bits = 0", "freeze_weights_epochs = 0.0",
                  'weight_init = "lsq"', "bn_reestimate_batches = 0")


def identity(toml_text: str) -> str:
    """A resolved config's text as a run's identity: what decides its result, not where files lie or how the
    file is laid out (`canonical_text`). Left out: `data.root` (where the dataset lives) and later fields at their
    defaults (LATER_DEFAULTS); a teacher or init that is a run directory counts by its name (which holds its own
    config hash), not its location."""
    out = []
    for ln in canonical_text(tomllib.loads(toml_text)).splitlines(keepends=True):
        key, _, value = ln.strip().partition(" = ")
        if ln.strip() in LATER_DEFAULTS or key == "root":
            continue
        if key in ("teacher", "init") and "/" in value:
            ln = f'{key} = "{Path(value.strip().strip(chr(34))).name}"\n'
        out.append(ln)
    return "".join(out)


# Settings that choose how a run computes, not what it computes: two records whose configs differ only in these
# are the same experiment on other arithmetic (the report collects both, `records.other_arithmetic`, and holds them
# apart by their recorded arithmetic and machine). Each has its own run identity, so neither resumes the other.
ARITHMETIC_SETTINGS = {"train": ("device", "precision", "threads", "channels_last")}


def differences(a_text: str, b_text: str, limit: int = 3) -> str:
    """Where two config texts differ, key by key: "optim.lr 0.05 -> 0.02" (a key one lacks: "(absent)"); the
    first `limit`, then how many more."""

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):  # [[distill.terms]]
            return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}.").items()}
        return {prefix[:-1]: obj}

    a, b = flat(tomllib.loads(a_text)), flat(tomllib.loads(b_text))
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "(absent)") != b.get(k, "(absent)")]
    if not keys and a_text != b_text:
        return "the same values, written another way"
    said = [f"{k} {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys[:limit]]
    return ", ".join(said) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (loads back with `load_config` to an equal Config)."""
    return tomli_w.dumps(to_dict(cfg))
