"""torch's own integer path: an integer-residual CIFAR ResNet as a program of quantize / dequantize ops that
`torch.compile` (inductor, weights frozen) lowers to oneDNN int8 convolutions (AMX or VNNI where the CPU has them).

    run = compile_int8(model)            # model: a quantized CIFAR ResNet with quant.residual = "int"
    logits = run(uint8_images)           # (N, 3, H, W) uint8 -> (N, K) float32

The program (`Int8Program`) is written in the ops PT2E's `convert_pt2e` emits (`quantized_decomposed`
quantize_per_tensor / dequantize_per_tensor / dequantize_per_channel), in the patterns inductor fuses: DQ -> conv
(DQ int8 weights per channel, float bias) -> hardtanh -> Q becomes one `onednn.qconv_pointwise` with its clamp
fused. It computes the trained arithmetic of `vaqkd.quant.residual` exactly as written there, with no calibration
of its own (PT2E's X86InductorQuantizer would observe and choose 8-bit steps of its own, a different model):

    stream codes u (uint8 at step s)  -> conv1 (2-bit codes, BatchNorm folded: scale in the per-channel weight
    scale, shift as the float bias) -> clamp(0, Qp·s2) -> Q(s2): conv2's 2-bit input codes -> conv2 -> Q_mid
    (signed 8-bit: uint8 at zero point 128) -> DQ + shortcut(DQ(u)) -> relu -> clamp -> Q: the next stream.

Quantize's `quant_min`/`quant_max` are not honoured by inductor's fused kernels (measured: codes up to 6 from a
0..3 quantizer), so every clamp narrower than uint8 is written as a float hardtanh before Q, which they do fuse.
The FP32 stem and FC (the default policy) stay float, the stem computed within half an ulp of exact
(`deploy.stem`: a float32 conv's own rounding moves stream codes). What it supports: CIFAR ResNets with an
integer residual (`quant.residual = "int"`, LSQ weights and activations); anything else is one ExportError.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.deploy.artifact import ExportError, weight_codes
from vaqkd.deploy.stem import ExactStem


def _ops():
    try:
        import torchao  # noqa: F401  (registers torch.ops.quantized_decomposed)
    except ImportError as e:  # optional extra
        raise ExportError("the torch int8 backend needs torchao: pip install 'vaqkd[deploy]'") from e
    return torch.ops.quantized_decomposed


def _q(x, scale: float, zp: int):
    return _ops().quantize_per_tensor.default(x, scale, zp, 0, 255, torch.uint8)


def _dq(x, scale: float, zp: int):
    return _ops().dequantize_per_tensor.default(x, scale, zp, 0, 255, torch.uint8)


def _step(q) -> float:
    from vaqkd.quant import LSQQuantizer

    if not isinstance(q, LSQQuantizer) or q.per_channel:
        raise ExportError(f"{type(q).__name__}: the torch int8 backend takes per-tensor LSQ activations")
    return float(q.step.detach())


class _QConv(nn.Module):
    """A quantized conv with the BatchNorm after it folded in: int8 weight codes (negated where the folded scale
    is negative, so every per-channel scale is positive), float bias = the BatchNorm shift."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d):
        super().__init__()
        var, mean = bn.running_var.double(), bn.running_mean.double()
        scale = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
        shift = bn.bias.detach().double() - mean * scale
        codes, qn = weight_codes(conv)
        q = (codes + qn).to(torch.int64)
        ch = conv.w_quant.step.detach().double().reshape(-1) * scale  # one step, or one per channel
        # 8-bit codes cannot be negated in int8 (−128 has no +128): they keep the negative scale
        negatable = conv.w_quant.qn > -128
        sign = torch.where((ch < 0) & negatable, -1, 1).to(torch.int64)
        self.register_buffer("w", (q * sign.view(-1, 1, 1, 1)).to(torch.int8))
        self.register_buffer("w_scale", (ch * sign).float())
        self.register_buffer("w_zp", torch.zeros(conv.out_channels, dtype=torch.int64))
        self.register_buffer("bias", shift.float())
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        w = _ops().dequantize_per_channel.default(self.w, self.w_scale, self.w_zp, 0, -128, 127, torch.int8)
        return F.conv2d(x_hat, w, self.bias, self.stride, self.padding)


class _Block(nn.Module):
    def __init__(self, block: nn.Module, next_stream):
        super().__init__()
        self.conv1, self.conv2 = _QConv(block.conv1, block.bn1), _QConv(block.conv2, block.bn2)
        self.s_in = _step(block.stream)
        self.requant = block.stream is not block.conv1.a_quant  # a wide stream: conv1 reads its own 2-bit codes
        self.s_a1, self.qp_a1 = _step(block.conv1.a_quant), block.conv1.a_quant.qp
        self.s_a2, self.qp_a2 = _step(block.conv2.a_quant), block.conv2.a_quant.qp
        self.s_mid = _step(block.mid_quant)
        self.downsample, self.pad = block.downsample, block.pad
        # the next block's stream quantizer, or None for the last block (its output goes to the pool as float)
        self.s_out = _step(next_stream) if next_stream is not None else None
        self.qp_out = next_stream.qp if next_stream is not None else None

    def branch(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv2's float output, the shortcut): the block up to its mid requantization and add."""
        u_hat = _dq(u, self.s_in, 0)
        x = u_hat
        if self.requant:
            x = _dq(_q(F.hardtanh(u_hat, 0.0, self.qp_a1 * self.s_a1), self.s_a1, 0), self.s_a1, 0)
        h = F.hardtanh(self.conv1(x), 0.0, self.qp_a2 * self.s_a2)
        h = _dq(_q(h, self.s_a2, 0), self.s_a2, 0)
        sc = u_hat
        if self.downsample:
            sc = F.pad(sc[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.conv2(h), sc

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        y, sc = self.branch(u)
        out = F.relu(_dq(_q(y, self.s_mid, 128), self.s_mid, 128) + sc)
        if self.s_out is None:
            return out
        return _q(F.hardtanh(out, 0.0, self.qp_out * self.s_out), self.s_out, 0)


class Int8Program(nn.Module):
    """uint8 images -> logits: the stem and FC in float, every block in codes (see the module docstring)."""

    def __init__(self, model: nn.Module, mean255: np.ndarray, std255: np.ndarray):
        super().__init__()
        from vaqkd.quant.residual import IntResidualBlock

        blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
        if not blocks or not all(isinstance(b, IntResidualBlock) for b in blocks):
            raise ExportError(f"{type(model).__name__}: the torch int8 backend takes CIFAR ResNets trained with "
                              "quant.residual = int")  # fmt: skip
        if type(model.conv1) is not nn.Conv2d or type(model.fc) is not nn.Linear:
            raise ExportError("the torch int8 backend takes an FP32 first conv and last FC (first_last = fp32)")
        self.stem = ExactStem(model.conv1, model.bn1, (mean255, std255))  # within half an ulp: `deploy.stem`
        self.s_stem, self.qp_stem = _step(blocks[0].stream), blocks[0].stream.qp
        self.blocks = nn.ModuleList(_Block(b, n.stream if n is not None else None)
                                    for b, n in zip(blocks, [*blocks[1:], None]))  # fmt: skip
        self.fc = model.fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(images))
        u = _q(F.hardtanh(x, 0.0, self.qp_stem * self.s_stem), self.s_stem, 0)
        for b in self.blocks:
            u = b(u)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(u, 1), 1))


_OPTIONS = {"freezing": True, "realize_opcount_threshold": 1, "realize_reads_threshold": 1,
            "realize_acc_reads_threshold": 1}  # fmt: skip
"""freezing: weights as constants, which lets inductor prepack them for oneDNN. The realize thresholds make every
intermediate a tensor of its own: by default inductor recomputes a block's dequantize-add-quantize chain inside
each consumer, back through the residual stream (measured: twice the time of the whole net)."""


def _runner(program: nn.Module, example: torch.Tensor, options: dict):
    """program compiled by inductor under `options` (each new batch shape compiles once, under them too) as a
    function uint8 images (numpy) -> logits (numpy)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(program, dynamic=False)  # (options= does not reach freezing: the config is patched)

    def call(x: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(options), torch.no_grad():
            return compiled(x)

    call(example)

    def run(x: np.ndarray) -> np.ndarray:
        return call(torch.from_numpy(x)).numpy()

    run.input_type = "uint8"
    run.program = program
    return run


def compile_int8(model: nn.Module, mean255: np.ndarray, std255: np.ndarray, example: torch.Tensor):
    """The integer-residual student compiled (`Int8Program`, inductor with frozen weights) as a function uint8
    images -> logits; `example`: a batch of uint8 images (the first call compiles for its shape)."""
    return _runner(Int8Program(model.eval(), mean255, std255).eval(), example, _OPTIONS)


class _Normalised(nn.Module):
    def __init__(self, model: nn.Module, mean255, std255):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean255, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std255, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


def ptq_int8(model: nn.Module, mean255, std255, calibration: torch.Tensor, example: torch.Tensor):
    """An FP32 model quantized after training to 8 bits by PT2E's X86InductorQuantizer (its own observers,
    calibrated on `calibration` uint8 images) and compiled: the FP32 teacher's fastest torch deployment, for
    comparison. A different model from the FP32 one (its agreement says how far it moves); each batch shape is
    exported and compiled once."""
    _ops()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    net = _Normalised(model.eval(), mean255, std255).eval()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    programs: dict[tuple, object] = {}

    def program_for(x: torch.Tensor):
        if x.shape not in programs:
            prepared = prepare_pt2e(torch.export.export(net, (x,)).module(), quantizer)
            with torch.no_grad():
                for i in range(0, len(calibration), len(x)):
                    chunk = calibration[i : i + len(x)]
                    if len(chunk) == len(x):
                        prepared(chunk)
            programs[x.shape] = _runner(convert_pt2e(prepared), x, {"freezing": True})
        return programs[x.shape]

    program_for(example)

    def run(x: np.ndarray) -> np.ndarray:
        return program_for(torch.from_numpy(x))(x)

    run.input_type = "uint8"
    return run
