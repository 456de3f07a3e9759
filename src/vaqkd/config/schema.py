"""The config's schema: one frozen dataclass per section, every field typed, with its default and its range check
(`validate`, naming the key)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vaqkd.errors import ConfigError


def check(key: str, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


COUNT_MAX = 2**31 - 1  # a count beyond this is a typo, and would overflow the tensors it sizes or indexes


def count(key: str, value: int, lo: int) -> None:
    """A count (epochs, batches, images): an int in [lo, COUNT_MAX]."""
    check(key, lo <= value <= COUNT_MAX, f"must be in [{lo}, 2^31 - 1], got {value}")


def check_arch(key: str, arch: str) -> None:
    from vaqkd.models import MODELS

    check(key, arch in MODELS, f"unknown model {arch!r}; registered: {sorted(MODELS)}")


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
        check(f"{p}.dataset", self.dataset in ("cifar100", "cifar10", "folder"), "must be cifar100, cifar10 or folder")
        count(f"{p}.subset_per_class", self.subset_per_class, 0)
        count(f"{p}.test_subset_per_class", self.test_subset_per_class, 0)
        count(f"{p}.batch_size", self.batch_size, 1)
        count(f"{p}.eval_batch_size", self.eval_batch_size, 1)
        check(f"{p}.image_size", 8 <= self.image_size <= 1024, "must be in [8, 1024]")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet32"
    init: str = ""  # weights to start from: a run dir, a .safetensors file, "pretrained" or "pretrained:NAME"

    def validate(self, p: str) -> None:
        check_arch(f"{p}.arch", self.arch)


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

        check(f"{p}.w_bits", 1 <= self.w_bits <= 8, "must be in [1, 8]")
        check(f"{p}.a_bits", 1 <= self.a_bits <= 8, "must be in [1, 8]")
        check(f"{p}.weight", self.weight in WEIGHT_QUANTIZERS, f"must be one of {sorted(WEIGHT_QUANTIZERS)}")
        check(f"{p}.act", self.act in ACT_QUANTIZERS, f"must be one of {sorted(ACT_QUANTIZERS)}")
        w_min, a_min = WEIGHT_QUANTIZERS[self.weight].min_bits, ACT_QUANTIZERS[self.act].min_bits
        check(f"{p}.w_bits", self.w_bits >= w_min, f"{self.weight} needs at least {w_min} bits, got {self.w_bits}")
        check(f"{p}.a_bits", self.a_bits >= a_min, f"{self.act} needs at least {a_min} bits, got {self.a_bits}")
        check(f"{p}.per_channel", not self.per_channel or self.weight == "lsq", "per-channel steps exist for lsq only")
        check(f"{p}.first_last", self.first_last in ("fp32", "8", "same"), "must be fp32, 8 or same")
        count(f"{p}.calib_batches", self.calib_batches, 1)
        from vaqkd.quant.residual import RESIDUAL_MODES

        check(f"{p}.residual", self.residual in RESIDUAL_MODES, "must be float or int")
        check(f"{p}.residual_bits", self.residual_bits in (0, 2, 4, 8), "must be 0 (a_bits), 2, 4 or 8")
        check(f"{p}.weight_init", self.weight_init in ("lsq", "mse"), "must be lsq or mse")
        check(f"{p}.weight_init", self.weight_init == "lsq" or self.weight == "lsq", "mse initialises lsq steps only")
        if self.residual == "int":
            check(f"{p}.residual_bits", self.residual_bits in (0, self.a_bits) or self.residual_bits > self.a_bits,
                   f"must be >= a_bits ({self.a_bits}): the stream carries the convs' input codes")
            check(f"{p}.act", self.act == "lsq", "an integer residual stream needs lsq activations")


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
        count(f"{p}.epochs", self.epochs, 1)
        check(f"{p}.lr", self.lr > 0, "must be > 0")
        check(f"{p}.momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        check(f"{p}.weight_decay", self.weight_decay >= 0, "must be >= 0")
        check(
            f"{p}.schedule",
            self.schedule in ("multistep", "cosine", "onecycle"),
            "must be multistep, cosine or onecycle",
        )
        check(f"{p}.gamma", 0 < self.gamma <= 1, "must be in (0, 1]")
        check(f"{p}.warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "must be in [0, epochs)")
        check(f"{p}.milestones", list(self.milestones) == sorted(self.milestones), "must be increasing")
        check(f"{p}.milestones", all(m > 0 for m in self.milestones), "must be epochs > 0")
        check(f"{p}.quant_lr_scale", self.quant_lr_scale > 0, "must be > 0")
        check(f"{p}.freeze_weights_epochs", 0 <= self.freeze_weights_epochs < self.epochs, "must be in [0, epochs)")


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
        check(f"{p}.weight", self.weight >= 0, "must be >= 0")
        check(
            f"{p}.anchor_weights",
            len(self.anchor_weights) == len(self.anchor_bits),
            "needs one weight per anchor bit width",
        )
        check(f"{p}.anchor_weights", all(w >= 0 for w in self.anchor_weights), "must be >= 0")
        check(f"{p}.anchor_bits", all(1 <= b <= 16 for b in self.anchor_bits), "bit widths must be in [1, 16]")
        check(
            f"{p}.anchor_mode", self.anchor_mode in ("minmax", "absmax", "tensor"), "must be minmax, absmax or tensor"
        )
        check(f"{p}.anchor_bits", not self.anchor_bits or cls.uses_teacher, f"{self.kind} has no teacher to anchor")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # "" (no distillation), a run dir, a .safetensors file, "pretrained" or "pretrained:NAME"
    teacher_arch: str = "resnet32"
    terms: tuple[TermConfig, ...] = (TermConfig(),)

    def validate(self, p: str) -> None:
        check_arch(f"{p}.teacher_arch", self.teacher_arch)
        check(f"{p}.terms", len(self.terms) >= 1, "needs at least one term")
        for i, t in enumerate(self.terms):
            t.validate(f"{p}.terms.{i}")
        from vaqkd.distill.registry import TERMS

        needs_teacher = any(TERMS[t.kind].uses_teacher for t in self.terms)
        check(f"{p}.teacher", bool(self.teacher) or not needs_teacher, "distillation terms need a teacher")


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
        check(f"{p}.seed", 0 <= self.seed < 2**32, "must be in [0, 2^32)")
        check(f"{p}.precision", self.precision in ("auto", "fp32", "bf16"), "must be auto, fp32 or bf16")
        check(
            f"{p}.device",
            device_name_ok(self.device),
            "must be auto, cpu, cuda or cuda:N",
        )
        count(f"{p}.eval_every", self.eval_every, 1)
        count(f"{p}.checkpoint_every_steps", self.checkpoint_every_steps, 0)
        check(f"{p}.threads", 0 <= self.threads <= 4096, "must be in [0, 4096] (0: torch's default)")
        count(f"{p}.micro_batches", self.micro_batches, 1)
        count(f"{p}.bn_reestimate_batches", self.bn_reestimate_batches, 0)


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
        check("name", bool(plain),
               f"must be a plain folder name (no '/', '\\', '..' or control characters), got {self.name!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)
        return self
