"""The quantized convolution's integer forward (`quant.intconv`): exact, the float convolution's gradients, and
taken exactly where it applies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.quant import LSQQuantizer, QConv2d, intconv, ste
from vaqkd.quant.quantizers import DoReFaQuantizer, EWGSQuantizer, PACTQuantizer

pytestmark = pytest.mark.skipif(not intconv.enabled(), reason="no oneDNN int8 convolution here (x86 only)")


def _exact(codes, qw, s_x, s_w, **geometry) -> torch.Tensor:
    """fl(Σ q_x·q_w)·fl(s_x·s_w): the sum of integer products in float64 (exact), rounded once to float32."""
    acc = F.conv2d(codes.double(), qw.double(), **geometry).float()
    return acc * (s_x * s_w.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("a_bits, w_bits, stride, per_channel, groups", [
    (2, 2, 1, False, 1), (2, 2, 2, True, 1), (4, 4, 1, True, 2),
    (8, 7, 2, False, 1),  # the widest pair it takes: 2·255·64 <= 32,767 (int16 pairs without VNNI)
])  # fmt: skip
def test_the_integer_forward_is_the_exact_sum_scaled_once(a_bits, w_bits, stride, per_channel, groups):
    """On every oneDNN kernel (e.g. ONEDNN_MAX_CPU_ISA=AVX2, AVX512_CORE, AVX512_CORE_VNNI: the same bits)."""
    g = torch.Generator().manual_seed(a_bits + stride)
    qp, qwn, qwp = 2**a_bits - 1, -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    codes = torch.randint(0, qp + 1, (4, 8, 12, 12), generator=g, dtype=torch.uint8)
    codes[0] = qp  # the extremes: every pair of products at its largest
    qw = torch.randint(qwn, qwp + 1, (16, 8 // groups, 3, 3), generator=g).float()
    qw[0] = qwn
    s_x = torch.tensor(0.3712)
    s_w = torch.rand(16, 1, 1, 1, generator=g) * 0.1 + 0.01 if per_channel else torch.tensor(0.05131)
    x_hat, w_hat = codes.float() * s_x, qw * s_w
    geometry = dict(stride=stride, padding=1, groups=groups)
    for given in (codes, None):  # the codes from a kernel, or recovered from x_hat
        y = intconv.IntConv.apply(x_hat, w_hat, given, s_x, s_w, (stride,) * 2, (1, 1), (1, 1), groups)
        assert y.dtype == torch.float32 and y.is_contiguous()
        assert torch.equal(y, _exact(codes, qw, s_x, s_w.reshape(-1), **geometry))
    # the float32 convolution of the same tensors rounds each product and partial sum: within a few ulp of the
    # sum of the terms' magnitudes
    magnitude = F.conv2d(x_hat.abs(), w_hat.abs(), **geometry)
    assert ((F.conv2d(x_hat, w_hat, **geometry) - y).abs() <= 1e-6 * magnitude).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_backward_is_the_float_convolutions_bit_for_bit(channels_last):
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    s_x, s_w = torch.tensor(0.37), torch.tensor(0.05)
    x_hat = (torch.randint(0, 4, (4, 16, 10, 10), generator=g).float() * s_x).contiguous(memory_format=fmt)
    w_hat = torch.randint(-2, 2, (32, 16, 3, 3), generator=g).float() * s_w
    dy = torch.randn(4, 32, 5, 5, generator=g).contiguous(memory_format=fmt)
    a, b = x_hat.clone().requires_grad_(), w_hat.clone().requires_grad_()
    ref = torch.autograd.grad(F.conv2d(a, b, stride=2, padding=1), (a, b), dy)
    y = intconv.IntConv.apply(a, b, None, s_x, s_w, (2, 2), (1, 1), (1, 1), 1)
    assert y.is_contiguous(memory_format=fmt)
    got = torch.autograd.grad(y, (a, b), dy)
    assert all(torch.equal(r, o) for r, o in zip(ref, got))


def _qconv(act=LSQQuantizer, weight=LSQQuantizer, bias=False, **kw) -> QConv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=bias, **kw)
    q = QConv2d(conv, weight.for_weight(2, conv.weight), act(2, False))
    for m in (q.a_quant, q.w_quant):
        m.calibrating = True
    q(torch.rand(2, 8, 6, 6))
    for m in (q.a_quant, q.w_quant):
        m.calibrating = False
        m.finish_calibration()
    return q


def _float_conv(q: QConv2d, x: torch.Tensor) -> torch.Tensor:
    return q._conv_forward(q.a_quant(x), q.w_quant(q.weight), q.bias)


def test_qconv2d_takes_the_integer_forward_where_it_applies(monkeypatch):
    x = torch.rand(2, 8, 6, 6) * 2
    for act in (LSQQuantizer, PACTQuantizer):
        q = _qconv(act)
        x_hat, w_hat = q.a_quant(x), q.w_quant(q.weight)
        s_x, s_w = q.a_quant.code_step().detach(), q.w_quant.code_step().detach()
        exact = _exact(intconv.codes_of(x_hat, s_x), torch.round(w_hat / s_w), s_x, s_w.reshape(1), padding=1)
        assert torch.equal(q(x), exact), act.__name__
        monkeypatch.setenv("VAQKD_INT_CONV", "0")  # the float32 convolution, the earlier arithmetic
        assert torch.equal(q(x), _float_conv(q, x))
        monkeypatch.delenv("VAQKD_INT_CONV")
    q = _qconv()
    with torch.autocast("cpu", torch.bfloat16):  # a bf16 run keeps its bf16 convolution
        assert torch.equal(q(x), F.conv2d(q.a_quant(x), q.w_quant(q.weight), padding=1))
    for q in (_qconv(EWGSQuantizer), _qconv(weight=DoReFaQuantizer), _qconv(bias=True), _qconv(padding_mode="reflect")):
        assert intconv.applies(q, q.a_quant(x), q.w_quant(q.weight)) is None
        assert torch.equal(q(x), _float_conv(q, x))
    q = _qconv()
    q.a_quant.calibrating = True  # the input passes unquantized: no codes
    assert intconv.applies(q, x, q.w_quant(q.weight)) is None


def test_w8a8_keeps_the_float_convolution_everywhere():
    """2·255·128 overflows the int16 pairs of oneDNN's kernels without VNNI: the float32 conv on every machine."""
    q = _qconv()
    q.a_quant.bits, q.w_quant.bits = 8, 8
    x = torch.rand(2, 8, 6, 6)
    assert not intconv.module_ok(q) and torch.equal(q(x), _float_conv(q, x))
    q.w_quant.bits = 7
    assert intconv.module_ok(q)


def test_hooks_on_the_input_quantizer_see_it_called_and_the_codes_path_is_the_same():
    """A large input takes the kernels that write the codes (`with_codes`), unless the quantizer has hooks: then it
    is called as a module; the output is the same either way."""
    q = _qconv()
    x = torch.rand(64, 8, 16, 16) * 2  # above FUSE_MIN_NUMEL
    assert q.wants_codes(x)
    plain = q(x)
    seen = []
    handle = q.a_quant.register_forward_hook(lambda m, i, o: seen.append(o))
    assert not q.wants_codes(x) and torch.equal(q(x), plain) and len(seen) == 1
    handle.remove()


def test_the_output_has_the_float_convolutions_memory_format():
    q = _qconv().to(memory_format=torch.channels_last)  # a channels-last weight, a contiguous input
    x = torch.rand(2, 8, 6, 6)
    ref = _float_conv(q, x)
    y = q(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == ref.stride()


def test_the_kernels_codes_are_the_recovered_codes_and_change_nothing_else():
    g = torch.Generator().manual_seed(5)
    shape = (4, 16, 32, 32)  # above FUSE_MIN_NUMEL: the fused kernels
    s = torch.tensor(0.21, requires_grad=True)
    x, b, dy, dh = (torch.randn(shape, generator=g) for _ in range(4))
    outs = {}
    for codes in (False, True):
        xa, ba, sa = x.clone().requires_grad_(), b.clone().requires_grad_(), s.detach().clone().requires_grad_()
        y = ste.LSQQuant.apply(xa, sa, 0, 3, 0.01, True, codes)
        h, z, *c2 = ste.ReluLSQQuant.apply(xa, ba, sa, 3, 0.01, True, codes)
        if codes:
            y, c1 = y
            assert c1.dtype == torch.uint8 and torch.equal(c1, intconv.codes_of(y.detach(), s.detach()))
            assert torch.equal(c2[0], intconv.codes_of(z.detach(), s.detach()))
        torch.autograd.backward([y, h, z], [dy, dh, dy])
        outs[codes] = [t.detach() for t in (y, h, z, xa.grad, ba.grad, sa.grad)]
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))


def test_the_switch_is_part_of_the_arithmetic_fingerprint(monkeypatch):
    from vaqkd.engine.arithmetic import fingerprint

    cpu = torch.device("cpu")
    on = fingerprint(cpu, "fp32"), fingerprint(cpu, "bf16")
    monkeypatch.setenv("VAQKD_INT_CONV", "0")
    off = fingerprint(cpu, "fp32"), fingerprint(cpu, "bf16")
    assert on[0] != off[0]  # float32 training: the integer forward is another arithmetic
    assert on[1] == off[1]  # bf16 training keeps its bf16 convolution either way


def test_a_relu_quant_whose_x_hat_is_unused_passes_the_relus_gradient_alone():
    """With codes the Function's gradients are not materialised: an unused x_hat reaches the backward as None; the
    gradients equal those of the same call without codes (whose x_hat gradient is a materialised zero)."""
    g = torch.Generator().manual_seed(6)
    a, b, dh = (torch.randn(4, 16, 32, 32, generator=g) for _ in range(3))
    grads = []
    for codes in (False, True):
        aa, bb, s = a.clone().requires_grad_(), b.clone().requires_grad_(), torch.tensor(0.3, requires_grad=True)
        h = ste.ReluLSQQuant.apply(aa, bb, s, 3, 0.01, True, codes)[0]
        h.backward(dh)
        grads.append((aa.grad, bb.grad, s.grad))
    assert all(torch.equal(x, y) for x, y in zip(*grads))
