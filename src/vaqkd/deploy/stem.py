"""The exact stem: an FP32 first conv on normalised pixels, computed within about half an ulp of exact in float32
(the ulp of its dot products' magnitude, sum |n·w| + |shift|) by any runtime, whatever order its conv sums in.

An integer-residual student quantizes its stem's output to the first stream codes; a float32 conv moves some of
them (its rounding depends on the order of summation, which differs between PyTorch, ORT, OpenVINO and oneDNN), and
every later code inherits the move: on the full-data artifact nearly every disagreement of ORT and OpenVINO with
PyTorch began as a moved stem code (results/deploy/README.md). So the deployed programs compute the stem as

    n = n_hi + n_lo       the normalised pixels, from a table of the loader's float32 values (`pixel_table`;
                          a runtime computing x·(1/std) would not give them): n_hi = round(n / 2^e)·2^e with
                          |n_hi / 2^e| <= 2^PIXEL_BITS, n_lo = n − n_hi, both exact in float32
    w = w_hi + w_lo       the folded weights (`split_exact`): w_hi = k·unit per output channel, |k| small enough
                          that every partial sum of conv(n_hi, w_hi) is an integer times 2^e·unit below 2^23
    y = [conv(n_hi, w_hi) + shift_hi] − [−conv(n, w_lo) − conv(n_lo, w_hi) − shift_lo]

The first bracket is exact in float32 in any order; the second is ~2^-9 of it, so its rounding is negligible;
the one subtraction rounds once (a subtraction, not an add, which ORT may fuse into a conv's accumulation).
Used by `onnx_build.Builder.pixels_conv` and `torch_int8.Int8Program` (`ExactStem`: the same sums as one conv).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.deploy.artifact import ExportError
from vaqkd.deploy.onnx_grid import conv_bn_fold

PIXEL_BITS = 10  # the normalised pixels' high part: a·2^e with |a| <= 2^10


def pixel_table(normalise: tuple) -> tuple[np.ndarray, int]:
    """(n, e): n (C, 256) float32 the normalised value of every pixel value x in 0..255, (x − mean255)/std255 in
    float32 as the loader computes it; e with |n| < 2^(e + PIXEL_BITS). n_hi = round(n / 2^e)·2^e and n_lo = n − n_hi
    are then exact in float32 (n_hi is 0, or n and n_hi share n's ulp and differ by at most 2^(e−1))."""
    mean, std = (np.asarray(a, np.float32).reshape(-1, 1) for a in normalise)
    n = (np.arange(256, dtype=np.float32)[None, :] - mean) / std
    return n, int(np.frexp(np.abs(n).max())[1]) - PIXEL_BITS


def split_exact(w: np.ndarray, in_bits: int = PIXEL_BITS, unit_floor: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:  # fmt: skip
    """(hi, lo, unit) with w = hi + lo per output channel (axis 0): hi = k·unit, unit a power of two, |k| as wide
    as lets the conv's fan-in products with `in_bits`-bit integers sum within 2^23 (so a float32 conv of hi on such
    inputs is exact, in any order of summation); lo the rest (rounded to float32). `unit_floor`: per channel, a
    unit no finer than this (fewer bits in hi). None where hi would keep fewer than 4 bits (a fan-in too large for
    the split to pay)."""
    fan_in = w[0].size
    bits = int(np.floor(np.log2(2.0**23 / (fan_in * 2.0**in_bits))))
    if bits < 4:
        return None
    peak = np.abs(w.reshape(len(w), -1)).max(1)
    unit = np.ldexp(1.0, np.frexp(peak)[1] - bits)  # |w / unit| < 2^bits
    if unit_floor is not None:
        unit = np.maximum(unit, unit_floor)
    u = unit.reshape(-1, *[1] * (w.ndim - 1))
    hi = np.round(w / u) * u
    return hi.astype(np.float32), (w - hi).astype(np.float32), unit


def exact_parts(w: np.ndarray, shift: np.ndarray, normalise: tuple) -> dict[str, np.ndarray] | None:
    """The table and weights of the exact stem (module docstring), float32: the pixel table `n` (C, 256) and the
    `grid` 2^e (n_hi = round(n / grid)·grid, n_lo = n − n_hi), `w_hi` and `b_hi` (the exact conv), `w_lo` and `b_lo`
    (the rest: y = conv(n_hi, w_hi) + b_hi + conv(n, w_lo) + conv(n_lo, w_hi) + b_lo). None where the weights do not
    split."""
    n, e = pixel_table(normalise)
    # the shift's high part must fit the exact conv's grid too (below 2^22 cells): where the shift is large against
    # the weights, the grid is made coarser (the rest then carries more of the weights, and stays small against y)
    split = split_exact(w, unit_floor=np.ldexp(1.0, np.frexp(np.abs(shift))[1] - 22 - e))
    if split is None:
        return None
    w_hi, w_lo, unit = split
    cell = unit * 2.0**e  # the exact conv's partial sums are integers times this, per output channel
    b_hi = np.round(shift / cell) * cell  # |shift / cell| <= 2^22
    return {"n": n, "grid": np.array(2.0**e, np.float32), "w_hi": w_hi, "b_hi": b_hi.astype(np.float32),
            "w_lo": w_lo, "b_lo": (shift - b_hi).astype(np.float32)}  # fmt: skip


class ExactStem(nn.Module):
    """uint8 images -> bn(conv(normalised images)) as the module docstring computes it (torch's int8 program), the
    two convs as one of twice the outputs on [n_hi, n_lo]: [w_hi, 0] (exact: the zeros add nothing) and the rest
    [−w_lo, −w] (w = w_hi + w_lo; conv(n_hi, w_lo) + conv(n_lo, w) is the same rest), then one subtraction: one
    oneDNN call instead of two (in an uncommitted paired probe the compiled program ran at ×0.92–0.95 of the plain
    stem's against ×0.85–0.88 with two convs). Where the weights do not split (a wide fan-in, groups), the plain
    float32 conv on the table's pixels."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, normalise: tuple):
        super().__init__()
        scale, shift = conv_bn_fold(conv, bn)
        w = conv.weight.detach().double().numpy() * scale[:, None, None, None]
        parts = exact_parts(w, shift, normalise) if conv.groups == 1 else None
        c_out, c_in = w.shape[:2]
        if parts is None:
            buffers = {"n": pixel_table(normalise)[0], "w": w.astype(np.float32), "b": shift.astype(np.float32)}
        else:
            w_hi, w_lo = parts["w_hi"], parts["w_lo"]
            both = np.zeros((2 * c_out, 2 * c_in, *w.shape[2:]), np.float32)
            both[:c_out, :c_in] = w_hi
            both[c_out:, :c_in], both[c_out:, c_in:] = -w_lo, -(w_hi.astype(np.float64) + w_lo)
            buffers = {"n": parts["n"], "grid": parts["grid"], "grid_inv": np.float32(1) / parts["grid"],
                       "w": both, "b": np.concatenate([parts["b_hi"], -parts["b_lo"]])}  # fmt: skip
        buffers["rows"] = np.arange(len(buffers["n"])).reshape(1, -1, 1, 1) * 256
        for name, a in buffers.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(a)))
        self.exact, self.c_out = parts is not None, c_out
        self.conv = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ExportError(f"the exact stem takes uint8 images, got {images.dtype}")
        n = self.n.view(-1)[images.long() + self.rows]
        if not self.exact:
            return F.conv2d(n, self.w, self.b, **self.conv)
        hi = torch.round(n * self.grid_inv) * self.grid
        out = F.conv2d(torch.cat([hi, n - hi], 1), self.w, self.b, **self.conv)
        return out[:, : self.c_out] - out[:, self.c_out :]
