"""The integer residual stream (`quant.residual = "int"`): what crosses a block is codes times a step, the shortcut
acts on codes, the config refuses what it cannot build, and the float default keeps every run's identity."""

import pytest
import torch
import torch.nn.functional as F

from vaqkd.config import Config, load_config
from vaqkd.errors import ConfigError
from vaqkd.models import create_model
from vaqkd.presets import config_hash
from vaqkd.quant import IntResidualBlock, calibrate, quantize_student, residual_mode


def _student(bits=2, seed=0):
    torch.manual_seed(seed)
    m = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=bits)
    calibrate(m, [torch.randn(32, 3, 32, 32)])
    return m.eval()


def _is_codes(t: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> bool:
    c = t / step
    return bool(torch.allclose(c, c.round(), atol=1e-4)) and c.round().min() >= qn and c.round().max() <= qp


@pytest.mark.parametrize("bits", [2, 4])
def test_a_block_computes_the_integer_arithmetic_on_codes(bits):
    m = _student(bits)
    b = m.layer2[0]  # the downsampling block: stride-2 shortcut with zero channels
    assert isinstance(b, IntResidualBlock) and b.downsample and residual_mode(m) == ("int", bits)
    assert (b.stream.bits, hasattr(b, "stream_quant")) == (bits, bits != 2)
    x = F.relu(torch.randn(4, 16, 32, 32))
    s = b.stream.step.detach()
    x_s = torch.clamp(torch.round(x / s), 0, 2**bits - 1) * s  # the stream's codes
    assert _is_codes(b.stream(x).detach(), s, 0, 2**bits - 1)
    # reference: the same block written out from its parts
    a2 = b.conv1.a_quant.step.detach()
    c1_in = torch.clamp(torch.round(x_s / a2), 0, 3) * a2 if bits != 2 else x_s
    w1 = b.conv1.w_quant(b.conv1.weight)
    h = F.relu(b.bn1(F.conv2d(c1_in, w1, None, 2, 1)))
    mid = b.bn2(b.conv2(h))
    sm = b.mid_quant.step.detach()
    mid_q = torch.clamp(torch.round(mid / sm), -128, 127) * sm
    assert _is_codes(mid_q, sm, -128, 127)
    sc = F.pad(x_s[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert _is_codes(sc, s, 0, 2**bits - 1)  # the shortcut carries codes of the stream
    ref = F.relu(mid_q + sc)
    with torch.no_grad():
        assert torch.allclose(b(x), ref, atol=1e-5)


def test_every_block_input_is_stream_codes_and_gradients_reach_the_new_steps():
    m = _student(2).train()
    seen = []
    for blk in [*m.layer1, *m.layer2, *m.layer3]:
        blk.stream.register_forward_hook(lambda mod, inp, out: seen.append((out.detach(), mod)))
    m(torch.randn(8, 3, 32, 32)).logsumexp(1).sum().backward()
    assert len({id(q) for _, q in seen}) == 9  # every block's stream (watched, conv1 re-reads its codes as a layer)
    for x_hat, q in seen:
        assert _is_codes(x_hat, q.step.detach(), 0, 3)
    for blk in [*m.layer1, *m.layer2, *m.layer3]:
        assert blk.mid_quant.step.grad is not None and blk.mid_quant.step.grad.abs() > 0


def test_float_residual_default_keeps_run_identities_and_int_changes_them():
    cfg = load_config("configs/cifar100/qkd_logit.toml")
    assert (cfg.quant.residual, cfg.quant.residual_bits) == ("float", 0)
    from vaqkd.config import identity, to_toml

    assert "residual" not in identity(to_toml(cfg))  # records made before the field exist keep their hash
    int_cfg = load_config("configs/cifar100/qkd_logit.toml", [("quant.residual", "int")])
    assert config_hash(int_cfg) != config_hash(cfg)
    assert config_hash(load_config("configs/cifar100/qkd_logit.toml", [("quant.residual_bits", 4)])) != config_hash(cfg)


@pytest.mark.parametrize("overrides, needle", [
    ([("quant.residual", "integer")], "quant.residual: must be float or int"),
    ([("quant.residual", "int"), ("quant.residual_bits", 3)], "quant.residual_bits: must be 0 (a_bits), 2, 4 or 8"),
    ([("quant.residual", "int"), ("quant.a_bits", 4), ("quant.residual_bits", 2)],
     "quant.residual_bits: must be >= a_bits (4)"),
    ([("quant.residual", "int"), ("quant.act", "pact")], "quant.act: an integer residual stream needs lsq"),
])  # fmt: skip
def test_the_config_refuses_what_it_cannot_build(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/cifar100/qkd_logit.toml", overrides)


def test_a_model_without_cifar_resnet_blocks_is_named():
    with pytest.raises(ConfigError, match="WideResNet.*CIFAR ResNets only"):
        quantize_student(create_model("wrn_16_2", 10), residual="int")


def test_the_packed_artifact_keeps_the_integer_residual(tmp_path):
    from vaqkd.deploy import load, pack_model, save_artifact

    m = _student(4)
    tensors, summary = pack_model(m)
    header = {"format": "vaqkd-packed", "version": 2, "arch": "resnet20", "num_classes": 10, "dataset": "folder",
              "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "source_run": "test", "git_sha": None,
              "top1_last": None,
              "quant": {"w_bits": 2, "a_bits": 2, "weight": "lsq", "act": "lsq", "per_channel": False,
                        "first_last": "fp32", "residual": "int", "residual_bits": 4}, **summary}  # fmt: skip
    save_artifact(tmp_path / "m.safetensors", tensors, header)
    back, _ = load(tmp_path / "m.safetensors")
    x = torch.randn(4, 3, 32, 32)
    assert residual_mode(back) == ("int", 4)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_config_dataclass_default_is_float_and_the_stream_width_follows_a_bits():
    assert Config().quant.residual == "float"
    w4 = load_config("configs/cifar100/takd_w4a4.toml", [("quant.residual", "int")])  # a table's --set reaches it
    m = quantize_student(create_model("resnet20", 10), 4, 4, residual="int", residual_bits=w4.quant.residual_bits)
    assert residual_mode(m) == ("int", 4) and not hasattr(m.layer1[0], "stream_quant")


def _fast_and_plain(bits: int, batch: int = 8):
    """A training-mode student on the fast path (`IntStage`) and a copy whose stages run block by block; each
    quantizer counts 4x its batch (as a rank's shard does) and Q_mid's steps are shrunk so that it clips."""
    import copy

    from vaqkd.quant import remove_fusions, set_grad_batch
    from vaqkd.quant.residual import IntStage

    torch.manual_seed(0)
    m = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=bits).train()
    x = torch.randn(batch, 3, 32, 32)
    calibrate(m, [x])
    set_grad_batch(m, 4)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, IntResidualBlock):
                b.mid_quant.step.mul_(0.1)  # ~7 % of conv2's outputs beyond the 8-bit codes
    plain = copy.deepcopy(m)
    remove_fusions(plain)
    assert sum(type(s) is IntStage for s in m.modules()) == 3
    assert not any(type(s) is IntStage for s in plain.modules())
    return m, plain, x


def _step_and_grads(model, x, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "bits, dtype, compiled",
    [(2, "fp32", "0"), (8, "fp32", "0"), (2, "bf16", "0"), (8, "bf16", "0"), (2, "fp32", "1"), (8, "bf16", "1")],
)
def test_the_fast_path_computes_what_the_blocks_compute_one_by_one(bits, dtype, compiled, monkeypatch):
    """The fused block ends (`IntEndQuant`, `IntAddQuant`) run, and outputs and every gradient equal the plain
    blocks' exactly, the steps' gradient sums up to summation order; with eager and with compiled kernels (bf16:
    the compiled kernels round where the plain path's separate ops store)."""
    from vaqkd.quant import ste

    monkeypatch.setenv("VAQKD_COMPILE", compiled)
    for name in ("lsq_forward", "lsq_backward", "int_end_forward", "int_end_backward", "int_add_forward",
                 "int_add_backward"):  # fmt: skip
        f = getattr(ste, name)
        monkeypatch.setattr(ste, name, ste.Fused(f.eager, f.options))  # fresh: compiled per VAQKD_COMPILE
    calls = []
    for cls in (ste.IntEndQuant, ste.IntAddQuant):
        monkeypatch.setattr(cls, "apply", (lambda f: lambda *a: calls.append(f) or f(*a))(cls.apply))
    fast, plain, x = _fast_and_plain(bits)
    out, grads = _step_and_grads(fast, x, dtype)
    # layer1 and layer2 (8·16·32·32, 8·32·16·16 elements) take the fused kernels, layer3 (8·64·8·8) the eager path
    assert len(calls) == 6
    calls.clear()
    ref, ref_grads = _step_and_grads(plain, x, dtype)
    assert not calls and torch.equal(out, ref) and grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        if k.endswith(".step"):
            torch.testing.assert_close(grads[k], g, rtol=1e-5 if dtype == "fp32" else 1e-3, atol=0, msg=k)
        else:
            assert torch.equal(grads[k], g), k


def test_a_hook_inside_a_stage_runs_it_block_by_block(monkeypatch):
    from vaqkd.quant import ste

    calls, apply = [], ste.IntEndQuant.apply
    monkeypatch.setattr(ste.IntEndQuant, "apply", lambda *a: calls.append(1) or apply(*a))
    fast, _, x = _fast_and_plain(2)
    seen = []
    fast.layer1[2].register_forward_hook(lambda mod, inp, out: seen.append(out))
    fast(x)
    assert len(seen) == 1 and calls == [1, 1]  # layer1 watched: block by block; layer2 still fused (two ends)
