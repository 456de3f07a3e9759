"""Fake quantizers: modules with `bits` and `forward(x) -> x_hat` (x_hat on the same scale as x).

Weight quantizers are signed, activation quantizers unsigned (they follow a ReLU) unless `signed=True` (the
network input). Data-driven initialisation: `vaqkd.quant.calibrate` sets `calibrating` on every quantizer,
runs a few batches through the model (each quantizer `observe`s its input), then calls `finish_calibration`.

>>> q = LSQQuantizer(bits=2, signed=True)
>>> x_hat = q(torch.randn(64))
>>> len(torch.unique(x_hat)) <= 4
True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaqkd.quant.ste import FUSE_MIN_NUMEL, EWGSDiscretize, EWGSQuant, LSQQuant, ReluLSQQuant, RoundSTE


class Quantizer(nn.Module):
    min_bits = 2
    takes_signed = True  # can quantize a signed input (the normalised image before the first conv)

    @classmethod
    def for_weight(cls, bits: int, weight: torch.Tensor, per_channel: bool = False) -> Quantizer:
        """The quantizer of a layer's `weight` (signed). `per_channel`: one step per output channel, where the
        quantizer has that (LSQ); `config` refuses it for the others."""
        return cls(bits, True)

    def __init__(self, bits: int, signed: bool):
        super().__init__()
        if not self.min_bits <= bits <= 16:
            raise ValueError(f"{type(self).__name__}: bits must be in [{self.min_bits}, 16], got {bits}")
        self.bits, self.signed = bits, signed
        self.calibrating = False
        self._obs_sum, self._obs_n = 0.0, 0
        # an activation quantizer that sees 1/k of the batch (a rank's shard, a micro-batch) counts k times its
        # input in LSQ's gradient scale, so the step gradient is the whole batch's (set by the engine)
        self.grad_batch = 1

    @property
    def qn(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qp(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    clamps_at_zero = False  # True: q(x) == q(relu(x)), so a model may skip the ReLU before this quantizer

    def observe(self, x: torch.Tensor) -> None:  # accumulate an init statistic; see subclasses
        pass

    def calibration_pass(self, x: torch.Tensor) -> torch.Tensor:
        """While calibrating: record statistics and return the input unquantized -- as the FP32 model would see
        it, so with the ReLU this quantizer may have absorbed applied."""
        if self.clamps_at_zero:
            x = x.clamp_min(0)
        self.observe(x)
        return x

    def finish_calibration(self) -> None:
        pass

    def relu_quant(self, a: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h, q(h)) for h = relu(a + b) computed in one fused pass, or None where this quantizer has no fused
        kernel (the caller then applies the ReLU and the quantizer separately)."""
        return None

    def code_step(self) -> torch.Tensor | None:
        """The step s where every output is an integer code times s (x_hat = q·s: what `quant.intconv`'s integer
        convolution needs), else None (and None while calibrating: the output is then the input itself)."""
        return None

    def with_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_hat, codes): x_hat = self(x) and, where a fused kernel writes them in the same pass, its uint8 codes
        (in x's memory format), else None (a consumer recovers them from x_hat: the same integers). Calls the
        kernels directly, not the module: a caller with hooks on this quantizer calls `self(x)` instead."""
        return self(x), None

    def relu_quant_codes(self, a: torch.Tensor, b: torch.Tensor | None = None):
        """`relu_quant` with the codes as `with_codes` gives them: (h, q(h), codes or None), or None."""
        fused = self.relu_quant(a, b)
        return None if fused is None else (*fused, None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


@torch.no_grad()
def mse_step(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grid: int = 100) -> torch.Tensor:
    """The step (shaped like `step`: per tensor, or per output channel) among `grid` candidates spanning
    (0, 1.5]·`step` that minimises Σ (clamp(round(x/s), Qn, Qp)·s − x)² over each step's elements."""
    x = x.detach().float()
    dims = tuple(range(1, x.ndim)) if step.ndim else tuple(range(x.ndim))
    best, best_err = step.clone().float(), None
    for k in range(1, grid + 1):
        s = step.float() * (1.5 * k / grid)
        err = ((torch.clamp(torch.round(x / s), qn, qp) * s - x) ** 2).sum(dims)
        err = err.view_as(step) if step.ndim else err
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.minimum(err, best_err)
    return best.to(step.dtype)


class LSQQuantizer(Quantizer):
    """Learned step size quantization (Esser et al., ICLR 2020).

    x_hat = clamp(round(x/s), Qn, Qp)·s; step init s = 2·mean|x|/√Qp; step gradient scaled by 1/√(N·Qp).
    Per-channel (weights): one step per output channel, N counted per channel.
    """

    @classmethod
    def for_weight(cls, bits: int, weight: torch.Tensor, per_channel: bool = False) -> LSQQuantizer:
        return cls(bits, True, per_channel=per_channel, channels=weight.shape[0], ndim=weight.ndim)

    def __init__(self, bits: int, signed: bool, per_channel: bool = False, channels: int = 1, ndim: int = 4):
        super().__init__(bits, signed)
        self.clamps_at_zero = not signed  # Qn = 0: q(x) = q(relu(x)), gradients included
        shape = (channels,) + (1,) * (ndim - 1) if per_channel else ()
        self.per_channel = per_channel
        self.step = nn.Parameter(torch.ones(shape))

    def _stat(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return x.detach().abs().flatten(1).mean(1).view_as(self.step)
        return x.detach().abs().mean()

    def observe(self, x: torch.Tensor) -> None:
        self._obs_sum = self._obs_sum + self._stat(x).float()
        self._obs_n += 1

    def finish_calibration(self) -> None:
        if self._obs_n:
            s = 2 * self._obs_sum / self._obs_n / math.sqrt(self.qp)
            self.step.data.copy_(s.clamp_min(1e-8))
            self._obs_sum, self._obs_n = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return self.calibration_pass(x)
        n = x.numel() // self.step.numel() * self.grad_batch
        return LSQQuant.apply(x, self.step, self.qn, self.qp, 1.0 / math.sqrt(n * self.qp))

    def relu_quant(self, a: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.calibrating or self.signed or self.per_channel:
            return None
        return ReluLSQQuant.apply(a, b, self.step, self.qp, 1.0 / math.sqrt(a.numel() * self.grad_batch * self.qp))

    def code_step(self) -> torch.Tensor | None:
        return None if self.calibrating else self.step

    def with_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.calibrating or self.signed or self.per_channel or self.bits > 8 or x.numel() < FUSE_MIN_NUMEL:
            return self(x), None
        g = 1.0 / math.sqrt(x.numel() * self.grad_batch * self.qp)  # as `forward` (one step)
        return LSQQuant.apply(x, self.step, self.qn, self.qp, g, True, True)

    def relu_quant_codes(self, a: torch.Tensor, b: torch.Tensor | None = None):
        if self.calibrating or self.signed or self.per_channel or self.bits > 8:
            return super().relu_quant_codes(a, b)
        g = 1.0 / math.sqrt(a.numel() * self.grad_batch * self.qp)
        return ReluLSQQuant.apply(a, b, self.step, self.qp, g, True, True)


class EWGSQuantizer(Quantizer):
    """Element-wise gradient scaling (Lee et al., CVPR 2021) on a learnable interval [l, u].

    x_n = clamp((x - l)/(u - l), 0, 1); x_q = round(x_n·L)/L; x_hat = l + (u - l)·x_q, L = 2^b - 1.
    Backward through the discretizer: g_n = g_q·(1 + δ·sign(g_q)·(x_n - x_q)). δ is a fixed buffer (1e-3, the
    paper's initial value): the paper's periodic δ update from a Hessian-trace estimate is not implemented;
    `set_delta` changes δ by hand.
    Init: weights l, u = ∓3·std(x); activations l = 0, u = mean + 3·std. Activations (≥ 64k elements) run
    as one fused kernel each way (`EWGSQuant`); weights through the composite below (same gradients).
    """

    def __init__(self, bits: int, signed: bool, delta: float = 1e-3):
        super().__init__(bits, signed)
        self.lower = nn.Parameter(torch.tensor(-1.0 if signed else 0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("delta", torch.tensor(float(delta)))
        self.delta_value = float(delta)  # a host copy: reading the buffer each forward would sync a GPU

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        stat = torch.stack([x.mean(), x.std()])
        self._obs_sum = self._obs_sum + stat
        self._obs_n += 1

    def finish_calibration(self) -> None:
        if self._obs_n:
            mean, std = (self._obs_sum / self._obs_n).tolist()
            lo, hi = (mean - 3 * std, mean + 3 * std) if self.signed else (0.0, max(mean + 3 * std, 1e-3))
            self.lower.data.fill_(lo)
            self.upper.data.fill_(hi)
            self._obs_sum, self._obs_n = 0.0, 0

    def set_delta(self, delta: float) -> None:
        self.delta.fill_(delta)
        self.delta_value = float(delta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.delta_value = float(self.delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return self.calibration_pass(x)
        if x.numel() >= FUSE_MIN_NUMEL:  # activations: one fused kernel each way
            return EWGSQuant.apply(x, self.lower, self.upper, 2**self.bits - 1, self.delta_value)
        width = (self.upper - self.lower).clamp_min(1e-8)
        xn = ((x - self.lower) / width).clamp(0, 1)
        xq = EWGSDiscretize.apply(xn, 2**self.bits - 1, self.delta_value)
        return self.lower + width * xq


class PACTQuantizer(Quantizer):
    """PACT (Choi et al. 2018): y = clamp(x, 0, α), x_hat = round(y·L/α)·α/L, L = 2^b - 1; α learnable with the
    paper's gradient ∂x_hat/∂α = 1 where x ≥ α, 0 elsewhere (eq. 3: the rounding is straight-through).
    Activations only. Init α = mean + 3·std of the calibration activations (the paper starts at 10).

    Forward, this is LSQ's unsigned grid with step α/L; so it runs on the LSQ kernels (fused, and fused with a
    preceding ReLU), with the quantization-error term of LSQ's step gradient switched off."""

    takes_signed = False

    def __init__(self, bits: int, signed: bool = False):
        if signed:
            raise ValueError("PACTQuantizer: PACT clips at 0 and is for unsigned (post-ReLU) activations only")
        super().__init__(bits, signed)
        self.clamps_at_zero = True  # clamp(x, 0, alpha): a preceding ReLU changes nothing
        self.alpha = nn.Parameter(torch.tensor(10.0))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self._obs_sum = self._obs_sum + (x.mean() + 3 * x.std())
        self._obs_n += 1

    def finish_calibration(self) -> None:
        if self._obs_n:
            self.alpha.data.fill_(max(float(self._obs_sum / self._obs_n), 1e-3))
            self._obs_sum, self._obs_n = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return self.calibration_pass(x)
        levels = 2**self.bits - 1
        # ds = Σ dy·x_hat/s over x ≥ α (x_hat = α there), and dα = ds/L: Σ dy·1[x ≥ α]
        return LSQQuant.apply(x, self.alpha / levels, 0, levels, 1.0, False)

    def relu_quant(self, a: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.calibrating:
            return None
        levels = 2**self.bits - 1
        return ReluLSQQuant.apply(a, b, self.alpha / levels, levels, 1.0, False)

    def code_step(self) -> torch.Tensor | None:
        return None if self.calibrating else self.alpha / (2**self.bits - 1)

    def with_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.calibrating or self.bits > 8 or x.numel() < FUSE_MIN_NUMEL:
            return self(x), None
        levels = 2**self.bits - 1
        return LSQQuant.apply(x, self.alpha / levels, 0, levels, 1.0, False, True)

    def relu_quant_codes(self, a: torch.Tensor, b: torch.Tensor | None = None):
        if self.calibrating or self.bits > 8:
            return super().relu_quant_codes(a, b)
        levels = 2**self.bits - 1
        return ReluLSQQuant.apply(a, b, self.alpha / levels, levels, 1.0, False, True)


class DoReFaQuantizer(Quantizer):
    """DoReFa weights (Zhou et al. 2016): w_t = tanh(w)/(2·max|tanh(w)|) + 1/2, w_hat = 2·round(w_t·L)/L - 1.
    Output lies in [-1, 1] (BatchNorm after the conv absorbs the scale). 1 bit: sign(w)·mean|w|. No
    learnable parameters. Not idempotent: the tanh normalisation moves already-quantized values."""

    min_bits = 1

    def __init__(self, bits: int, signed: bool = True):
        super().__init__(bits, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return x
        if self.bits == 1:
            scale = x.detach().abs().mean()
            return scale * torch.where(x >= 0, 1.0, -1.0) + (x - x.detach())  # value ±E|w|, gradient 1
        t = torch.tanh(x)
        t = t / (2 * t.abs().max().detach()) + 0.5
        levels = 2**self.bits - 1
        return 2 * RoundSTE.apply(t * levels) / levels - 1


WEIGHT_QUANTIZERS = {"lsq": LSQQuantizer, "ewgs": EWGSQuantizer, "dorefa": DoReFaQuantizer}
ACT_QUANTIZERS = {"lsq": LSQQuantizer, "ewgs": EWGSQuantizer, "pact": PACTQuantizer}
