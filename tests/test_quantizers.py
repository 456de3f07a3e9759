import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaqkd.quant import (
    ACT_QUANTIZERS,
    WEIGHT_QUANTIZERS,
    DoReFaQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    calibrate,  # fmt: skip
    quantize,
)
from vaqkd.quant.ste import LSQQuant

SETTINGS = settings(max_examples=25, deadline=None)
bits_st = st.integers(2, 8)
seed_st = st.integers(0, 2**16)


def _x(seed, n=257, scale=2.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


QUANTIZERS = {**WEIGHT_QUANTIZERS, **ACT_QUANTIZERS}  # every registered quantizer by name


def _make(kind, bits, signed):
    return QUANTIZERS[kind](bits, signed)


def _calibrated(kind, bits, signed, x):
    q = _make(kind, bits, signed)
    q.calibrating = True
    q(x)
    q.calibrating = False
    q.finish_calibration()
    return q


# every registered quantizer: weights signed; activations signed and unsigned where they take signed inputs
CASES = list(dict.fromkeys([(name, True) for name in WEIGHT_QUANTIZERS] + [
    (name, signed) for name, cls in ACT_QUANTIZERS.items() for signed in ((True, False)[not cls.takes_signed :])
]))  # fmt: skip


def test_the_cases_cover_every_registered_quantizer():
    assert {k for k, _ in CASES} == set(QUANTIZERS) and ("pact", True) not in CASES and len(CASES) == 6


@pytest.mark.parametrize("kind,signed", CASES)
@SETTINGS
@given(bits=bits_st, seed=seed_st)
def test_at_most_2_to_the_b_values(kind, signed, bits, seed):
    x = _x(seed, 1000)
    q = _calibrated(kind, bits, signed, x)
    assert len(torch.unique(q(x).detach())) <= 2**bits


@pytest.mark.parametrize("kind,signed", [c for c in CASES if c[0] != "dorefa"])
@SETTINGS
@given(bits=bits_st, seed=seed_st)
def test_idempotent(kind, signed, bits, seed):
    x = _x(seed)
    q = _calibrated(kind, bits, signed, x)
    y = q(x).detach()
    assert torch.allclose(q(y).detach(), y, atol=1e-5 * float(y.abs().max() + 1))


@pytest.mark.parametrize("kind,signed", [("lsq", True), ("lsq", False), ("ewgs", True), ("pact", False)])
@SETTINGS
@given(bits=bits_st, seed=seed_st)
def test_straight_through_gradient_one_inside_zero_outside(kind, signed, bits, seed):
    x = _x(seed).requires_grad_()
    q = _calibrated(kind, bits, signed, x.detach())
    if kind == "ewgs":
        q.set_delta(0.0)  # EWGS with delta = 0 is the plain STE
    q(x).sum().backward()
    if kind == "lsq":
        v = x.detach() / q.step.detach()
        inside = (v >= q.qn) & (v <= q.qp)
    elif kind == "ewgs":
        inside = (x.detach() > q.lower.detach()) & (x.detach() < q.upper.detach())
    else:
        inside = (x.detach() > 0) & (x.detach() < q.alpha.detach())
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())), atol=1e-5)
    assert torch.all(x.grad[~inside] == 0)


@SETTINGS
@given(bits=bits_st, seed=seed_st, signed=st.booleans())
def test_lsq_step_gradient_matches_formula(bits, seed, signed):
    x = _x(seed)
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    q = _calibrated("lsq", bits, signed, x)
    q(x).backward(g_out)
    s = q.step.detach()
    v = x / s
    term = torch.where(v <= q.qn, float(q.qn), torch.where(v >= q.qp, float(q.qp), torch.round(v) - v))
    expected = (g_out * term).sum() / math.sqrt(x.numel() * q.qp)
    assert torch.allclose(q.step.grad, expected, rtol=1e-4, atol=1e-6)


def test_lsq_function_matches_autograd_reference():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    s = torch.full((4, 1, 1, 1), 0.3, requires_grad=True)
    g = 1 / math.sqrt(75 * 1)
    LSQQuant.apply(x, s, -2, 1, g).pow(2).sum().backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    # the round/clamp/detach formulation of the LSQ paper
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, -2, 1)
    y = ((v.round() - v).detach() + v) * s_scaled
    y.pow(2).sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-6) and torch.allclose(gs, s.grad, atol=1e-5)


@SETTINGS
@given(bits=bits_st, seed=seed_st)
def test_pact_clipping_gradient_is_the_papers(bits, seed):
    """PACT eq. 3: the rounding is straight-through, so dL/dα = Σ dL/dx_hat over the elements with x ≥ α, and
    x_hat = round(clamp(x, 0, α)·L/α)·α/L."""
    x = _x(seed) * 2
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    q = _calibrated("pact", bits, False, x)
    y = q(x)
    y.backward(g_out)
    a, levels = q.alpha.detach(), 2**bits - 1
    expected_y = torch.round(torch.clamp(x, 0, a) * levels / a) * a / levels
    assert torch.allclose(y.detach(), expected_y, atol=1e-5 * float(a))
    assert torch.allclose(q.alpha.grad, g_out[x >= a].sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,signed", [c for c in CASES if c[0] != "dorefa"])
def test_learnable_parameters_receive_gradients(kind, signed):
    x = _x(0)
    q = _calibrated(kind, 2, signed, x)
    q(x * 1.5).pow(2).sum().backward()
    params = list(q.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_lsq_init_and_bits_checks():
    x = _x(3)
    q = _calibrated("lsq", 2, True, x)
    assert torch.allclose(q.step, 2 * x.abs().mean() / math.sqrt(1))
    with pytest.raises(ValueError, match="bits must be in"):
        LSQQuantizer(1, True)
    with pytest.raises(ValueError, match="unsigned"):
        PACTQuantizer(2, signed=True)
    assert len(torch.unique(DoReFaQuantizer(1)(x))) == 2


def test_quantize_policies_and_calibration():
    from vaqkd.models import create_model
    from vaqkd.quant import QConv2d, QLinear

    for policy, first_bits in (("fp32", None), ("8", 8), ("same", 2)):
        m = quantize(create_model("resnet20", 10), 2, 2, first_last=policy)
        qlayers = [x for x in m.modules() if isinstance(x, (QConv2d, QLinear))]
        assert isinstance(m.layer1[0].conv1, QConv2d) and m.layer1[0].conv1.w_bits == 2
        if first_bits is None:
            assert not isinstance(m.conv1, QConv2d) and not isinstance(m.fc, QLinear) and len(qlayers) == 19 - 1
        else:
            assert m.conv1.w_bits == first_bits and m.fc.a_bits == first_bits and m.conv1.a_quant.signed
    m = quantize(create_model("resnet20", 10), 2, 2)
    x = torch.randn(8, 3, 32, 32)
    assert calibrate(m, [x]) == 1
    assert m.layer1[0].conv1.a_quant.step.item() != 1.0  # initialised from data
    with pytest.raises(ValueError, match="already quantized"):
        quantize(m, 2, 2)


def test_calibration_of_a_fresh_student_uses_batch_statistics():
    """A student trained from scratch (BatchNorm at mean 0, var 1): every step is initialised from the
    activations training will see (train-mode BatchNorm), and the running statistics do not move."""
    from vaqkd.models import create_model

    torch.manual_seed(0)
    fp = create_model("resnet32", 100)
    m = quantize(create_model("resnet32", 100), 2, 2)
    m.load_state_dict(fp.state_dict(), strict=False)
    x = torch.randn(16, 3, 32, 32)
    running = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    calibrate(m, [x])
    assert all(torch.equal(m.state_dict()[k], v) for k, v in running.items())
    # what the conv's input quantizer sees in a train-mode forward of the FP32 model: relu(block output)
    seen = {}
    fp.layer3[4].conv2.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0].detach()))
    fp.train()
    with torch.no_grad():
        fp(x)
    expected = 2 * seen["x"].relu().abs().mean() / math.sqrt(3)
    step = m.layer3[4].conv2.a_quant.step.detach()
    assert torch.allclose(step, expected, rtol=1e-4), (step, expected)
    fp.eval()  # in eval mode the initial running statistics give a far larger step (the old behaviour)
    seen.clear()
    with torch.no_grad():
        fp(x)
    assert 2 * seen["x"].relu().mean() / math.sqrt(3) > 10 * step


@pytest.mark.parametrize("act", ["lsq", "pact", "ewgs"])
def test_skipping_the_relu_before_a_clamping_quantizer_is_exact(act):
    """The quantized block skips the ReLU before conv2 when its quantizer clamps at zero: same outputs and
    gradients."""
    from vaqkd.models import create_model

    torch.manual_seed(0)
    m = quantize(create_model("resnet20", 10), 2, 2, act=act)
    x = torch.randn(4, 3, 32, 32)
    calibrate(m, [x])
    block = m.layer1[0]
    assert block.conv2.a_quant.clamps_at_zero == (act != "ewgs")
    h = torch.randn(4, 16, 32, 32, requires_grad=True)
    pre = block.bn1(block.conv1(h))
    a = block.conv2.a_quant(torch.relu(pre))
    b = block.conv2.a_quant(pre)
    if act != "ewgs":
        assert torch.equal(a, b)
        ga = torch.autograd.grad(a.sum(), [h, *block.conv2.a_quant.parameters()], retain_graph=True)
        gb = torch.autograd.grad(b.sum(), [h, *block.conv2.a_quant.parameters()])
        for u, v in zip(ga, gb):
            assert torch.allclose(u, v, atol=1e-6)


def test_compiled_lsq_kernels_match_eager(monkeypatch):
    from vaqkd.quant import ste

    monkeypatch.setenv("VAQKD_COMPILE", "1")
    fwd, bwd = ste.Fused(ste._lsq_forward), ste.Fused(ste._lsq_backward)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 16, 32, 32).relu().to(dtype)
        s = torch.tensor(0.4)  # the step stays fp32; the kernels compute in fp32
        y = fwd(x, s, 0, 3)
        assert fwd.fn is not fwd.eager  # really compiled (or the test would compare eager with eager)
        assert y.dtype == dtype and torch.equal(y, ste._lsq_forward(x, s, 0, 3))
        dy = torch.randn_like(x)
        dx, ds = bwd(dy, x, s, 0, 3, 0.5)
        dx_e, ds_e = ste._lsq_backward(dy, x, s, 0, 3, 0.5)
        assert ds.dtype == torch.float32 and ds.shape == s.shape
        assert torch.equal(dx, dx_e) and torch.allclose(ds, ds_e, rtol=1e-4)


def _boundary_input(s: float, qn: int, qp: int, dtype, n: int = 1 << 16) -> torch.Tensor:
    """Values on and right around the clip points Qn·s and Qp·s (as x's dtype rounds them) and rounding ties,
    with random values between: the elements a bf16-rounded step puts on the wrong side of the range."""
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([qn * s, qp * s, (qp + 0.5) * s, (qn - 0.5) * s, 0.5 * s, 1.5 * s])
    jitter = 1 + (torch.rand(n // 2, generator=g) - 0.5) * 0.02
    near = edges[torch.randint(0, len(edges), (n // 2,), generator=g)] * jitter
    rand = (torch.rand(n - n // 2, generator=g) * (qp - qn + 2) + qn - 1) * s
    return torch.cat([near, rand]).to(dtype)


@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("kind", ["lsq_signed", "lsq_unsigned", "pact", "relu_lsq"])
def test_bf16_backward_agrees_with_fp32_at_the_clip_boundary(kind, compiled, monkeypatch):
    """A bf16 input's gradients equal those of the same values in fp32: the forward clips with the fp32 step,
    so the backward must use the same mask (not one built from the step rounded to bf16) and the exact error
    term. Eager (small tensors, VAQKD_COMPILE=0) and compiled paths, inputs placed at the clip points."""
    from vaqkd.quant import ste

    monkeypatch.setenv("VAQKD_COMPILE", compiled)
    for f in (ste.relu_lsq_forward, ste.relu_lsq_backward, ste.lsq_forward, ste.lsq_backward):
        monkeypatch.setattr(f, "fn", None)
    qn, qp, err = {"lsq_signed": (-2, 1, True), "lsq_unsigned": (0, 3, True), "pact": (0, 3, False),
                   "relu_lsq": (0, 3, True)}[kind]  # fmt: skip
    step = 0.999
    for n in (8, 1 << 16):  # below and above the fused-kernel size
        xb = _boundary_input(step, qn, qp, torch.bfloat16, n)
        grads = []
        for x0 in (xb, xb.float()):
            x = x0.clone().requires_grad_(True)
            s = torch.tensor(step, requires_grad=True)
            if kind == "relu_lsq":
                h, y = ste.ReluLSQQuant.apply(x, None, s, qp, 0.01, err)
            else:
                y = LSQQuant.apply(x, s, qn, qp, 0.01, err)
            dy = torch.linspace(-1, 1, n).bfloat16().to(x.dtype)  # the same values in both dtypes
            y.backward(dy)
            grads.append((y.detach().float(), x.grad.float(), s.grad))
        (yb, dxb, dsb), (yf, dxf, dsf) = grads
        assert torch.equal(yb, yf.bfloat16().float())  # the forward already agreed
        assert torch.equal(dxb, dxf), n  # the same elements pass gradient
        assert torch.allclose(dsb, dsf, rtol=1e-5, atol=1e-6), (n, dsb, dsf)


def test_issue_reproduction_bf16_lsq_at_the_clip_point():
    s = torch.tensor(0.999, requires_grad=True)
    x = torch.full((4,), 3.0, dtype=torch.bfloat16, requires_grad=True)
    LSQQuant.apply(x, s, 0, 3, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0] * 4 and s.grad.item() == 12.0  # fp32's answer (was 1 and 0)
    a = torch.tensor(3 * 0.999, requires_grad=True)  # PACT: α = 3 s, dα = Σ dy over x ≥ α
    x = torch.full((8,), 3.0, dtype=torch.bfloat16, requires_grad=True)
    LSQQuant.apply(x, a / 3, 0, 3, 1.0, False).sum().backward()
    assert a.grad.item() == pytest.approx(8.0)


@pytest.mark.parametrize("act", ["lsq", "pact", "ewgs"])
def test_calibration_sees_the_fp32_function(act):
    """While calibrating, a quantized model computes exactly its FP32 original (ReLUs it skips included), so
    every quantizer is initialised from the activations the FP32 model really has."""
    import copy

    from vaqkd.models import create_model
    from vaqkd.quant import quantizers

    torch.manual_seed(0)
    fp = create_model("resnet20", 10).eval()
    q = quantize(copy.deepcopy(fp), 2, 2, act=act).eval()
    x = torch.randn(4, 3, 32, 32)
    for m in quantizers(q):
        m.calibrating = True
    assert torch.allclose(q(x), fp(x), atol=1e-5)


def test_compiled_anchor_matches_eager(monkeypatch):
    from vaqkd.distill import anchors
    from vaqkd.quant.compiled import Fused

    monkeypatch.setenv("VAQKD_COMPILE", "1")
    fused = Fused(anchors._minmax_anchor)
    r = torch.randn(8, 32, 16, 16).relu().bfloat16()
    a = fused(r, 3)
    assert fused.fn is not fused.eager
    assert (a != anchors._minmax_anchor(r, 3)).float().mean() < 1e-3  # ties at .5 may round either way


@pytest.mark.parametrize("act", ["lsq", "pact"])
@pytest.mark.parametrize("compiled", ["0", "1"])
def test_fused_block_output_relu_and_next_quantizer_equal_the_separate_ops(compiled, act, monkeypatch):
    """install_fusions() installs the fused residual stages (a block's closing ReLU and the next conv's input quantizer
    in one pass, ReluLSQQuant); removing them gives the plain blocks. Outputs and every gradient are equal
    (bit for bit in eager fp32), and a training step gives the same weights."""
    import copy

    from vaqkd.models import create_model
    from vaqkd.quant import ste
    from vaqkd.quant.fusion import FusedStage, install_fusions, remove_fusions

    monkeypatch.setenv("VAQKD_COMPILE", compiled)
    for f in (ste.relu_lsq_forward, ste.relu_lsq_backward, ste.lsq_forward, ste.lsq_backward):
        monkeypatch.setattr(f, "fn", None)
    torch.manual_seed(0)
    fused = install_fusions(quantize(create_model("resnet20", 10), 2, 2, act=act))
    assert all(type(s) is FusedStage for s in (fused.layer1, fused.layer2, fused.layer3))
    x = torch.randn(4, 3, 32, 32)
    calibrate(fused, [x])
    plain = copy.deepcopy(fused)
    remove_fusions(plain)
    assert type(plain.layer1) is torch.nn.Sequential and type(plain.layer1[0]).__name__ == "BasicBlock"
    calls = []
    orig = ste.ReluLSQQuant.apply
    monkeypatch.setattr(ste.ReluLSQQuant, "apply", lambda *a: calls.append(1) or orig(*a))
    outs = []
    for model in (fused, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        f = model.forward_features(x)
        (f["logits"].square().mean() + f["layer2"].mean()).backward()  # a stage output gets a gradient of its own
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        outs.append((f["logits"], grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert len(calls) == 3 * 2  # the fused path was taken: 2 block boundaries inside each of the 3 stages
    exact = compiled == "0"
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    assert same(outs[0][0], outs[1][0])
    for name in outs[1][1]:
        assert same(outs[0][1][name], outs[1][1][name]), name
        assert same(outs[0][2][name], outs[1][2][name]), name


def test_fused_model_keeps_no_state_between_forwards_and_hooks_see_every_block():
    from vaqkd.models import create_model, features

    torch.manual_seed(0)
    m = quantize(create_model("resnet20", 10), 2, 2)
    x = torch.randn(2, 3, 32, 32)
    calibrate(m, [x])
    m.eval()  # (in train mode BatchNorm's running statistics move, as they should)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = {n: dict(vars(mod)) for n, mod in m.named_modules()}
    with torch.no_grad():
        y1 = m(x)
        f = features(m, x, ["layer2.1"])  # a hook on a block inside a fused stage: the plain path for that stage
        y2 = m(x)
    assert torch.equal(y1, y2) and torch.equal(f["logits"], y1) and f["layer2.1"].shape == (2, 32, 16, 16)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    seen = []  # a hook on a conv inside a fused stage fires too (the size/BOPs dry run relies on it)
    h = m.layer2[1].conv1.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        m(x)
    h.remove()
    assert seen == [1]
    assert {n: set(vars(mod)) for n, mod in m.named_modules()} == {n: set(a) for n, a in attrs.items()}


@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("signed,delta", [(False, 1e-3), (False, 0.5), (True, 0.2)])
def test_fused_ewgs_equals_the_composite(compiled, signed, delta, monkeypatch):
    """EWGSQuant (one kernel each way) gives the outputs and the x / lower / upper gradients of the composite
    interval + EWGSDiscretize + autograd formulation (fp32), including EWGS's gradient scaling."""
    import importlib

    from vaqkd.quant import ste

    qmod = importlib.import_module("vaqkd.quant.quantizers")  # the module; the package exports a function so named
    monkeypatch.setenv("VAQKD_COMPILE", compiled)
    for f in (ste.ewgs_forward, ste.ewgs_backward):
        monkeypatch.setattr(f, "fn", None)
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32, 32) * 2
    g_out = torch.randn_like(x)
    q = _calibrated("ewgs", 2, signed, x)
    q.set_delta(delta)
    res = []
    for limit in (ste.FUSE_MIN_NUMEL, x.numel() + 1):  # fused, then the composite
        monkeypatch.setattr(qmod, "FUSE_MIN_NUMEL", limit)
        xi = x.clone().requires_grad_()
        q.zero_grad()
        y = q(xi)
        y.backward(g_out)
        res.append((y.detach(), xi.grad, q.lower.grad.clone(), q.upper.grad.clone()))
    (y1, gx1, gl1, gu1), (y2, gx2, gl2, gu2) = res
    assert torch.allclose(y1, y2, atol=1e-6)
    assert torch.allclose(gx1, gx2, atol=1e-6)
    assert torch.allclose(gl1, gl2, rtol=1e-4, atol=1e-3) and torch.allclose(gu1, gu2, rtol=1e-4, atol=1e-3)
    assert gl1.abs() > 0 and gu1.abs() > 0


@pytest.mark.parametrize("fused_relu", [False, True])
def test_grad_batch_gives_a_part_of_the_batch_the_whole_batch_step_gradient(fused_relu):
    """A rank's shard (or a micro-batch) of 1/k of the batch with grad_batch = k: the step gradients of the k
    parts add up to the whole batch's (LSQ's g = 1/sqrt(N·Qp) counts the whole batch); with grad_batch = 1
    they come out sqrt(k) too large."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 8, 6, 6), torch.randn(64, 8, 6, 6)

    def step_grad(k: int, grad_batch: int) -> torch.Tensor:
        q = LSQQuantizer(2, signed=False)
        q.step.data.fill_(0.4)
        q.grad_batch = grad_batch
        for xc, wc in zip(x.chunk(k), w.chunk(k)):
            out = q.relu_quant(xc)[1] if fused_relu else q(xc.relu())
            ((out * wc).sum() / len(x)).backward()
        return q.step.grad.clone()

    whole = step_grad(1, 1)
    assert whole.abs() > 1e-3
    assert torch.allclose(step_grad(2, 2), whole, rtol=1e-5)
    assert torch.allclose(step_grad(2, 1), whole * math.sqrt(2), rtol=1e-5)


def test_mse_step_lowers_the_rounding_error_per_tensor_and_per_channel():
    from vaqkd.quant.quantizers import LSQQuantizer, mse_step

    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2.0, 8).view(8, 1, 1, 1)  # channels of different scales
    for per_channel in (False, True):
        q = LSQQuantizer.for_weight(2, w, per_channel)
        q.observe(w)
        q.finish_calibration()  # LSQ's init
        dims = (1, 2, 3) if per_channel else (0, 1, 2, 3)

        def err(step, qn=q.qn, qp=q.qp, dims=dims):
            return ((torch.clamp(torch.round(w / step), qn, qp) * step - w) ** 2).sum(dims)

        s = mse_step(w, q.step.data, q.qn, q.qp)
        assert s.shape == q.step.shape
        e_lsq, e_mse = err(q.step.data).flatten(), err(s).flatten()
        assert (e_mse <= e_lsq).all()
        finer = torch.stack([err(q.step.data * k / 300).flatten() for k in range(1, 451)])  # (0, 1.5] in finer steps
        assert (e_mse <= finer.min(0).values * 1.01).all()  # the grid's best is within 1 % of a 3x finer search
    assert e_mse.sum() < 0.8 * e_lsq.sum()  # per channel, 2 bits: LSQ's initial steps round far too coarsely


def test_calibrate_with_mse_weight_init_sets_only_the_weight_steps():
    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize
    from vaqkd.quant.layers import QConv2d

    x = torch.randn(4, 3, 16, 16)
    steps = {}
    for init in ("lsq", "mse"):
        torch.manual_seed(0)
        m = quantize(create_model("resnet20", 10), 2, 2)
        calibrate(m, [x], weight_init=init)
        steps[init] = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("step")}
    w_steps = [n for n in steps["lsq"] if ".w_quant." in n]
    a_steps = [n for n in steps["lsq"] if ".a_quant." in n]
    assert w_steps and a_steps and isinstance(m.layer1[0].conv1, QConv2d)
    assert all(not torch.equal(steps["lsq"][n], steps["mse"][n]) for n in w_steps)
    assert all(torch.equal(steps["lsq"][n], steps["mse"][n]) for n in a_steps)
    with pytest.raises(ValueError, match="weight_init"):
        calibrate(m, [x], weight_init="nope")
