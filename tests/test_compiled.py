"""The fused kernels called directly (inductor's compiled modules) compute what `torch.compile` computes, bit for
bit, and only the calls a direct module can serve take that route."""

from __future__ import annotations

import pytest
import torch

from vaqkd.distill import anchors
from vaqkd.quant import compiled, ste
from vaqkd.quant.compiled import Fused, call_kind


def _t(shape, g, relu=False, dtype=torch.float32, fmt=torch.contiguous_format):
    t = torch.randn(shape, generator=g)
    return (t.relu() if relu else t).to(dtype).contiguous(memory_format=fmt)


def _cases(dtype, fmt, shape=(4, 16, 32, 32), seed=0):
    """(kernel, args) for the package's fused kernels (each of them, and the variants their callers use)."""
    g = torch.Generator().manual_seed(seed)
    x, a, b = _t(shape, g, True, dtype, fmt), _t(shape, g, False, dtype, fmt), _t(shape, g, False, dtype, fmt)
    dy, dh, y, sc = (_t(shape, g, False, dtype, fmt), _t(shape, g, False, dtype, fmt), _t(shape, g, False, dtype, fmt),
                     _t(shape, g, True, dtype, fmt))  # fmt: skip
    s, s2, lo, hi = torch.tensor(0.37), torch.tensor(0.05), torch.tensor(-0.4), torch.tensor(1.3)
    return {
        "lsq_forward": (ste.lsq_forward, (x, s, 0, 3)),
        "lsq_backward": (ste.lsq_backward, (dy, x, s, 0, 3, 0.013, True)),
        "lsq_backward_pact": (ste.lsq_backward, (dy, a, s, -2, 1, 0.02, False)),
        "relu_lsq_forward": (ste.relu_lsq_forward, (a, b, s, 3)),
        "relu_lsq_forward_no_b": (ste.relu_lsq_forward, (a, None, s, 3)),
        "relu_lsq_backward": (ste.relu_lsq_backward, (dy, dh, x, s, 3, 0.011, True)),
        "relu_lsq_backward_no_dh": (ste.relu_lsq_backward, (dy, None, x, s, 3, 0.011, True)),
        "int_end_forward": (ste.int_end_forward, (y, sc, s2, s, -128, 127, 3)),
        "int_end_backward": (ste.int_end_backward, (dy, y, sc, s2, s, -128, 127, 3, 0.003, 0.01)),
        "int_add_forward": (ste.int_add_forward, (y, sc, s2, -8, 7)),
        "int_add_backward": (ste.int_add_backward, (dh, x, y, s2, -8, 7, 0.004)),
        "ewgs_forward": (ste.ewgs_forward, (a, lo, hi, 3)),
        "ewgs_backward": (ste.ewgs_backward, (dy, a, lo, hi, 3, 0.2)),
        "minmax_anchor": (anchors._minmax_fused, (a.flatten(1), 2)),
    }


def _same(direct, dynamo, name):
    direct, dynamo = ((o,) if isinstance(o, torch.Tensor) else o for o in (direct, dynamo))
    assert len(direct) == len(dynamo), name
    for u, v in zip(direct, dynamo):
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride(), name
        assert torch.equal(u, v), name


@pytest.mark.parametrize(
    "dtype, fmt", [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)],
    ids=["fp32", "bf16-channels_last"],
)
def test_direct_modules_compute_what_torch_compile_computes(dtype, fmt, monkeypatch):
    """Bit for bit, on the first call's sizes and then on others (odd in every dimension) served by the same
    module; dynamo is held to compiling (no silent eager run at its recompile limit)."""
    monkeypatch.setenv("VAQKD_COMPILE", "1")
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True, raising=False)
    other = _cases(dtype, fmt, (5, 17, 31, 31), seed=1)  # the same kind (H = W), odd sizes, above DIRECT_MIN_NUMEL
    for name, (kernel, args) in _cases(dtype, fmt).items():
        fresh = Fused(kernel.eager, kernel.options)
        direct = fresh(*args)
        if fresh.fn is fresh.eager:
            pytest.skip("compilation is unavailable here")  # the fallback warned; nothing to compare
        ref = torch.compile(kernel.eager, dynamic=True, options=compiled._known(kernel.options))
        _same(direct, ref(*args), name)
        assert fresh.fn.dynamo is None and [m is not None for m in fresh.fn.modules.values()] == [True], name
        _same(fresh(*other[name][1]), ref(*other[name][1]), f"{name} at other sizes")
        assert len(fresh.fn.modules) == 1 and fresh.fn.dynamo is None, name  # the same module served them


def test_one_module_serves_every_scale_and_size(monkeypatch):
    """Float scales are inputs and sizes symbolic: one module for all of a kind's calls; a new constant, dtype or
    memory format is a new kind; a small call goes through dynamo."""
    monkeypatch.setenv("VAQKD_COMPILE", "1")
    f = Fused(ste._lsq_backward)
    g = torch.Generator().manual_seed(1)
    s = torch.tensor(0.5)
    for n, scale in ((4, 0.1), (6, 0.2), (5, 0.3)):
        x, dy = _t((n, 16, 32, 32), g), _t((n, 16, 32, 32), g)
        dx, ds = f(dy, x, s, -2, 1, scale, True)
        dx_e, ds_e = ste._lsq_backward(dy, x, s, -2, 1, scale, True)
        assert torch.equal(dx, dx_e) and torch.allclose(ds, ds_e, rtol=1e-4)
    if f.fn is f.eager:
        pytest.skip("compilation is unavailable here")
    assert len(f.fn.modules) == 1 and f.fn.dynamo is None
    f(dy, x, s, 0, 3, 0.1, True)
    f(dy.bfloat16(), x.bfloat16(), s, -2, 1, 0.1, True)
    assert len(f.fn.modules) == 3 and f.fn.dynamo is None
    f(dy[:1, :2], x[:1, :2], s, -2, 1, 0.1, True)
    assert len(f.fn.modules) == 3 and f.fn.dynamo is not None


def test_which_calls_take_the_direct_route():
    x = torch.randn(4, 16, 32, 32)
    s = torch.tensor(0.3)
    kind = call_kind((x, s, 0, 3, 0.5, True, None))
    assert kind is not None and kind == call_kind((torch.randn(7, 16, 32, 32), s, 0, 3, 0.9, True, None))
    assert kind != call_kind((torch.randn(4, 16, 32, 31), s, 0, 3, 0.5, True, None))  # another pattern of sizes
    assert kind != call_kind((x, s, -2, 1, 0.5, True, None))  # constants are compiled in
    assert call_kind((x, s, 1)) != call_kind((x, s, True))  # a bool is not the int it equals
    assert call_kind((x.contiguous(memory_format=torch.channels_last), s, 0, 3)) != call_kind((x, s, 0, 3))
    assert call_kind((x.transpose(2, 3), s, 0, 3)) is None  # neither contiguous nor channels-last
    assert call_kind((torch.randn(1, 16, 64, 64), s, 0, 3)) is None  # a size dynamo would specialise
    assert call_kind((torch.randn(4, 16, 16, 16), s, 0, 3)) is None  # under DIRECT_MIN_NUMEL: dynamo's guards
    assert call_kind((x, s, (1, 2))) is None  # a constant it does not know
    assert call_kind((x.requires_grad_(True), s)) is None  # would need autograd through the kernel
    with torch.no_grad():
        assert call_kind((x, s)) is not None


def test_a_float_that_meets_another_dtype_goes_through_dynamo(monkeypatch):
    """As a 0-d float32 tensor a float promotes a bf16 0-d tensor to float32, where a Python float keeps bf16."""
    monkeypatch.setenv("VAQKD_COMPILE", "1")

    def scale_bf16(x, s, g):
        return x * 2, (s.bfloat16() * g)  # the float meets a bf16 tensor

    f = Fused(scale_bf16)
    x, s = torch.randn(4, 16, 32, 32), torch.tensor(0.3)
    y, t = f(x, s, 0.1)
    assert t.dtype == torch.bfloat16 and torch.equal(t, s.bfloat16() * 0.1)
    if f.fn is not f.eager:
        assert list(f.fn.modules.values()) == [None] and f.fn.dynamo is not None


def test_a_kind_that_cannot_be_built_directly_goes_through_torch_compile(monkeypatch):
    monkeypatch.setenv("VAQKD_COMPILE", "1")

    def refuse(*a, **k):
        raise RuntimeError("no standalone compile here")

    monkeypatch.setattr(torch._inductor, "standalone_compile", refuse)
    f = Fused(ste._lsq_forward)
    x, s = torch.randn(4, 16, 32, 32), torch.tensor(0.3)
    with pytest.warns(UserWarning, match="_lsq_forward compiled through torch.compile"):
        y = f(x, s, 0, 3)
    assert torch.equal(y, ste._lsq_forward(x, s, 0, 3))
    if f.fn is f.eager:
        pytest.skip("compilation is unavailable here")
    assert list(f.fn.modules.values()) == [None] and f.fn.dynamo is not None  # dynamo served it


def test_a_kernel_that_cannot_compile_falls_back_to_eager_once(monkeypatch):
    monkeypatch.setenv("VAQKD_COMPILE", "1")
    from torch._dynamo.exc import TorchDynamoException

    def refuse(*a, **k):
        raise TorchDynamoException("no compiler here")

    monkeypatch.setattr(torch._inductor, "standalone_compile", refuse)
    monkeypatch.setattr(torch, "compile", lambda fn, **k: refuse)
    f = Fused(ste._lsq_forward)
    x, s = torch.randn(4, 16, 32, 32), torch.tensor(0.3)
    with pytest.warns(UserWarning, match="using eager quantizer kernels"):
        assert torch.equal(f(x, s, 0, 3), ste._lsq_forward(x, s, 0, 3))
    assert f.fn is f.eager
