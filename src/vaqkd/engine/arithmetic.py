"""The training arithmetic's fingerprint: what a run's numbers depend on besides its config and seed.

Two runs of one config and seed give the same numbers only when the code computes the same arithmetic on the
same kind of machine, precision and thread count. The fingerprint measures that directly: a few deterministic
training steps of a tiny fixed W2A2 ResNet (the project's own loader, quantizers, fused fast path, loss terms
with virtual anchors, CRD, optimizer and step) on the run's device, precision and threads, hashed together with
the evaluation and every parameter afterwards, computed as this one process's arithmetic whatever the torchrun
world size (which the records hold apart, `world_size`). Any change of the code or the machine that moves a bit of
those numbers changes it; a change that touches no arithmetic (a message, a refactor) keeps it. Recorded in
env.json under `arithmetic` (and in final.json); a resume on other arithmetic is refused, and reports pair or
average runs only within one fingerprint.

The tiny step's activations are too small for the fused quantizer kernels that a real run's activations take
(`quant.ste.FUSE_MIN_NUMEL`: compiled LSQ/PACT and EWGS kernels, whose step-gradient sums differ in the last bits
from the eager ones), so a second fingerprint, `kernels_fingerprint`, runs the run's kind of them on a tensor large
enough, forward and backward; env.json records it beside the first as `arithmetic_kernels` (quantized runs).
It is a field of its own rather than a part of `arithmetic` so that the records made before it keep pairing by
`arithmetic` alone (a field one record lacks is not held against a pair, `analysis.kinds.same_machine`); a
resume is refused when either differs. The integer residual stream (`quant.residual = "int"`), which the tiny
step does not run either, has a third, `residual_fingerprint`, recorded as `arithmetic_residual` by those runs;
and quantizers other than LSQ (EWGS or DoReFa weights, PACT or EWGS activations: the tiny step's are LSQ) a
fourth, `quantizers_fingerprint`, recorded as `arithmetic_quantizers` by runs that use them.

The integer forward convolution (`quant.intconv`: on the CPU in float32, a quantized conv's forward as an exact
integer conv) is part of what the fingerprints measure: the tiny step's convs take it, so every float32 CPU
fingerprint moved when it came (the records before it computed the float32 conv; bf16 and CUDA fingerprints did not
move); with `VAQKD_INT_CONV=0` a process computes, and fingerprints, the float32 conv again
(`benchmarks/fingerprint_matrix.py` against the commit before it reads "same" on every line that way).

Records made before the fingerprint existed carry a reconstructed value instead (`LEGACY`): the era of their
git SHA against the measured boundary a20de37 (the fused stages moved into `quant.fusion`, which changed
bf16 rounding order: quick QKD logit seed 0 read 26.51 % at epoch 1 before and 23.12 % after, same machine).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import torch

from vaqkd import dist
from vaqkd.config import OptimConfig, TermConfig
from vaqkd.data.loader import DeviceLoader
from vaqkd.distill.objective import Objective, build_term
from vaqkd.engine.step import StudentLoss, evaluate, make_optimizer, train_step
from vaqkd.models import stage_channels
from vaqkd.models.resnet_cifar import CifarResNet
from vaqkd.quant import calibrate, install_fusions, quantize

STEPS = 3  # optimisation steps of the tiny run
BOUNDARY = "a20de37"  # the first commit whose training numbers differ from the records before it
LEGACY = {"before": "legacy:before-a20de37", "after": "legacy:a20de37-7894ee1", "unknown": "unknown"}

_TERMS = (
    TermConfig(kind="ce", weight=0.1),
    TermConfig(kind="kd", weight=0.45, anchor_bits=(2,), anchor_weights=(0.45,)),
    TermConfig(kind="hint", weight=1.0, params={"stage": "layer2"}, anchor_bits=(4,), anchor_weights=(0.5,)),
    TermConfig(kind="at", weight=10.0, params={"stage": "layer3"}),
    TermConfig(kind="crd", weight=0.8, params={"feat_dim": 8, "nce_k": 16}, anchor_bits=(2,), anchor_weights=(0.2,)),
)


def fingerprint(device: torch.device, precision: str) -> str:
    """16 hex digits naming the arithmetic of a training step on `device` in `precision` with the current
    number of threads (well under a second on a CPU core). Leaves the global RNG state as it found it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), dist.alone():
        torch.manual_seed(1234)
        n, classes, size = 32, 10, 8
        g = torch.Generator().manual_seed(1234)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.arange(n) % classes
        mean, std = (0.5, 0.45, 0.4), (0.25, 0.25, 0.27)
        train = DeviceLoader(images, labels, 16, mean, std, device, train=True, seed=7)
        test = DeviceLoader(images, labels, 16, mean, std, device, train=False)
        teacher = CifarResNet(14, classes).to(device).eval()
        student = quantize(CifarResNet(14, classes), 2, 2).to(device)
        install_fusions(student)  # as a run's student is built
        calibrate(student, (x for (x, _, _), _ in zip(train.batches(0), range(1))))
        s_ch, t_ch = (stage_channels(m, ["layer2", "layer3", "embedding"], size) for m in (student, teacher))
        objective = Objective(_TERMS, [build_term(t, s_ch, t_ch, labels, 0) for t in _TERMS]).to(device)
        module = StudentLoss(student, objective)
        opt = make_optimizer(replace(OptimConfig(), lr=0.05), student, objective)
        digest = hashlib.sha256(f"{device.type}|{precision}".encode())
        for step, (x, y, idx) in zip(range(STEPS), train.batches(0)):
            loss, parts, correct = train_step(module, teacher, opt, x, y, idx, step, precision, shard=(0, 1))
            values = torch.stack([loss.float(), *(v.float() for v in parts.values()), correct.float()])
            digest.update(values.detach().cpu().double().numpy().tobytes())
        digest.update(repr(evaluate(student, test, precision, combine=False)).encode())
        for name, t in sorted({**student.state_dict(), **objective.state_dict()}.items()):
            digest.update(name.encode())
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def float_conv_fingerprint(precision: str) -> str:
    """`fingerprint` on the CPU as this process would compute it with `VAQKD_INT_CONV=0` (the float32 convolution,
    the arithmetic before `quant.intconv`): what a record made before it carries."""
    before = os.environ.get("VAQKD_INT_CONV")
    os.environ["VAQKD_INT_CONV"] = "0"
    try:
        return fingerprint(torch.device("cpu"), precision)
    finally:
        if before is None:
            del os.environ["VAQKD_INT_CONV"]
        else:
            os.environ["VAQKD_INT_CONV"] = before


def kernels_fingerprint(device: torch.device, precision: str, act: str = "lsq", channels_last: bool = False) -> str:
    """16 hex digits naming the arithmetic of the fused activation-quantizer kernels of kind `act` ("lsq", "pact"
    or "ewgs"; compiled, or eager where compilation is off or failed) in the dtype `precision` trains activations
    in and the run's memory format: forward and backward through autograd on activation-sized tensors — the
    quantizer alone and, for LSQ and PACT, fused with the add and ReLU that end a residual block (`ReluLSQQuant`).
    EWGS's fused kernel on weights (only WRN weights are large enough) is `quantizers_fingerprint`'s. Leaves the
    global RNG alone."""
    from vaqkd.quant.ste import FUSE_MIN_NUMEL, EWGSQuant, LSQQuant, ReluLSQQuant

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(4321)
    shape = (16, 16, 16, max(16, -(-FUSE_MIN_NUMEL // (16 * 16 * 16))))

    def tensor(relu: bool = False, grad: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=g)
        t = (t.relu() if relu else t).to(device, dtype).contiguous(memory_format=fmt)
        return t.requires_grad_(grad)

    digest = hashlib.sha256(f"{device.type}|{precision}|{act}|{channels_last}".encode())
    x, a, b, dy, dh = tensor(True, True), tensor(grad=True), tensor(grad=True), tensor(), tensor()
    params = [torch.tensor(v, device=device, requires_grad=True) for v in (0.37, 0.05, 1.3)]
    if act == "ewgs":
        outs, grads = [EWGSQuant.apply(x, params[1], params[2], 3, 0.2)], [dy]
    else:  # PACT is LSQ's kernel without the in-range term of the step gradient
        err = act != "pact"
        outs = [LSQQuant.apply(x, params[0], 0, 3, 0.01, err), *ReluLSQQuant.apply(a, b, params[0], 3, 0.01, err)]
        grads = [dy, dh, dy]
    torch.autograd.backward(outs, grads)
    for t in (*outs, x.grad, a.grad, b.grad, *(p.grad for p in params)):
        if t is not None:
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def residual_fingerprint(device: torch.device, precision: str) -> str:
    """16 hex digits naming the arithmetic of the integer residual stream (`quant.residual = "int"`,
    `vaqkd.quant.residual`), which the tiny step (float residual) never runs: a W2A2 CIFAR ResNet-14 with each of
    the two stream paths — a 2-bit stream (the convs' own input quantizer serves the shortcut) and an 8-bit one (a
    stream quantizer of its own, requantized to 2 bits by each conv) — calibrated, one forward and backward each in
    training mode under the run's autocast, on images large enough that its first two stages take the fused
    quantizer kernels (the last stays below `FUSE_MIN_NUMEL`: the eager path, as a process's slice of a batch
    under 16 takes); hashed with the outputs and every gradient, computed as one process whatever the torchrun
    world size. Like `fingerprint` it names code and machine, not the run's config (the same value for every
    stream width), so integer runs of two widths still pair. Recorded as `arithmetic_residual` by integer-residual
    runs only, so it never stands between an integer run and its float-residual partner; a resume is refused when
    it differs. Leaves the global RNG alone."""
    from vaqkd.engine.setup import autocast
    from vaqkd.quant import quantize_student

    devices = [device] if device.type == "cuda" else []
    digest = hashlib.sha256(f"{device.type}|{precision}".encode())
    with torch.random.fork_rng(devices=devices), dist.alone():
        for bits in (2, 8):
            torch.manual_seed(4321)
            model = quantize_student(CifarResNet(14, 10), 2, 2, residual="int", residual_bits=bits).to(device).train()
            x = torch.randn(32, 3, 16, 16).to(device)  # layer1: 32·16·16·16 elements, layer2 32·32·8·8
            calibrate(model, [x])
            with autocast(device, precision):
                out = model(x)
            out.float().square().mean().backward()
            digest.update(out.detach().float().cpu().contiguous().numpy().tobytes())
            for name, p in sorted(model.named_parameters()):
                digest.update(name.encode())
                if p.grad is not None:
                    digest.update(p.grad.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def quantizers_fingerprint(device: torch.device, precision: str, weight: str = "lsq", act: str = "lsq",
                           channels_last: bool = False) -> str | None:  # fmt: skip
    """16 hex digits naming the arithmetic of a run's weight and activation quantizers where they are not the
    tiny step's LSQ (`quant.weight` EWGS or DoReFa, `quant.act` PACT or EWGS); None for LSQ on both, which the
    tiny step and `kernels_fingerprint` cover already. The weight quantizer is calibrated on a conv weight and run
    forward and backward on one small enough for its composite path and one large enough for its fused kernel (a
    WRN's widest convs: EWGS), in float32 as weights are; the activation quantizer on an activation below
    `FUSE_MIN_NUMEL` (its eager path: the fused one is `kernels_fingerprint`'s), in the run's training dtype and
    memory format. Recorded as `arithmetic_quantizers` by such runs only. Leaves the global RNG alone."""
    from vaqkd.quant import ACT_QUANTIZERS, WEIGHT_QUANTIZERS
    from vaqkd.quant.ste import FUSE_MIN_NUMEL

    if weight == "lsq" and act == "lsq":
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(2468)
    digest = hashlib.sha256(f"{device.type}|{precision}|{weight}|{act}|{channels_last}".encode())
    act_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    wide = -(-FUSE_MIN_NUMEL // (64 * 9))  # output channels of a conv weight (., 64, 3, 3) above the threshold
    cases = [(WEIGHT_QUANTIZERS[weight], True, (32, 16, 3, 3), torch.float32),
             (WEIGHT_QUANTIZERS[weight], True, (wide, 64, 3, 3), torch.float32),
             (ACT_QUANTIZERS[act], False, (8, 16, 8, 8), act_dtype)]  # fmt: skip
    for cls, signed, shape, dtype in cases:
        x = torch.randn(shape, generator=g)
        x = (x * 0.1 if signed else x.relu()).to(device, dtype).contiguous(memory_format=fmt).requires_grad_(True)
        dy = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
        q = (cls.for_weight(2, x.detach()) if signed else cls(2, False)).to(device)
        q.calibrating = True
        q(x.detach())
        q.calibrating = False
        q.finish_calibration()
        y = q(x)
        y.backward(dy)
        for t in (y, x.grad, *(p.grad for _, p in sorted(q.named_parameters()))):
            if t is not None:
                digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def legacy_era(git_sha: str, is_ancestor) -> str:
    """The reconstructed arithmetic of a record made before fingerprints: `is_ancestor(a, b)` says whether
    commit a is an ancestor of (or equal to) b, None when git does not know one of them."""
    sha = git_sha.removesuffix("-dirty")
    after = is_ancestor(BOUNDARY, sha)
    if after is None:
        return LEGACY["unknown"]
    return LEGACY["after"] if after else LEGACY["before"]
