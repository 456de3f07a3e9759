"""torch's own int8 path (`deploy.torch_int8`): the integer-residual student as quantize/dequantize ops that
inductor lowers to oneDNN int8 convs. It computes the trained arithmetic (eager: the model's logits), every block
conv becomes one qconv with its clamp fused, compiled it keeps the answers, and what it cannot take is one line."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from conftest import one_line_error as one_line  # noqa: E402
from conftest import stem_error  # noqa: E402
from test_onnx_graph import _trained_bn  # noqa: E402
from vaqkd.cli import main  # noqa: E402
from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import normalisation  # noqa: E402
from vaqkd.deploy.torch_int8 import Int8Program, compile_int8  # noqa: E402
from vaqkd.models import create_model  # noqa: E402
from vaqkd.quant import calibrate, quantize_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# oneDNN's int8 convs on x86 without VNNI sum u8·s8 pairs in int16 and pre-scale the weights to avoid saturating:
# not measured here, so the compiled tests run where VNNI or AMX is (Intel with AMX, AMD Zen 4)
needs_vnni = pytest.mark.skipif(not torch.cpu._is_vnni_supported(), reason="measured on VNNI/AMX CPUs only")
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _student(bits: int, per_channel: bool = False, w_bits: int = 2):
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10), w_bits=w_bits, per_channel=per_channel, residual="int",
                             residual_bits=bits)  # fmt: skip
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    m255, s255 = normalisation(MEAN, STD)
    x = (images.float() - torch.from_numpy(m255).view(1, 3, 1, 1)) / torch.from_numpy(s255).view(1, 3, 1, 1)
    calibrate(model, [x])
    return _trained_bn(model).eval(), images, x, (m255, s255)


@pytest.mark.parametrize("bits,per_channel,w_bits", [(2, False, 2), (8, False, 2), (2, True, 2), (2, False, 8)])
def test_the_program_computes_the_trained_arithmetic(bits, per_channel, w_bits):
    model, images, x, norm = _student(bits, per_channel, w_bits)  # per channel: one weight step per output channel
    if w_bits == 8:  # a code of -128 in a channel whose γ < 0: int8 has no +128 to negate it to
        conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
        conv.weight.data[0, 0, 0, 0] = -128 * float(conv.w_quant.step)
        bn.weight.data[0] = -bn.weight.data[0].abs()
    with torch.no_grad():
        ref, got = model(x), Int8Program(model, *norm)(images)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()


@needs_vnni
def test_compiled_every_block_conv_is_one_onednn_int8_conv_and_the_answers_stay():
    from torch._inductor.utils import run_and_get_code

    model, images, x, norm = _student(8)
    run = compile_int8(model, *norm, example=images)
    with torch.no_grad():
        ref = model(x)
    got = torch.from_numpy(run(images.numpy()))
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert (got - ref).abs().median() < 1e-3
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"freezing": True}), torch.no_grad():
        _, code = run_and_get_code(torch.compile(run.program), images)
    assert code[0].count("torch.ops.onednn.qconv_pointwise") == 18  # 9 blocks x 2 convs; the stem stays float


def test_the_programs_stem_is_computed_within_half_an_ulp_of_exact(monkeypatch):
    """As in the ONNX graph (`deploy.stem`): eager and compiled, the stem within ~half an ulp of its float64 value;
    the plain float32 conv (where the weights do not split) is not, on the same images."""
    from vaqkd.deploy import stem

    model, images, x, norm = _student(8)
    program = Int8Program(model, *norm).eval()
    assert program.stem.exact
    with torch.no_grad():
        assert stem_error(model.conv1, model.bn1, images, norm, program.stem(images).numpy()) <= 0.75
        assert stem_error(model.conv1, model.bn1, images, norm, torch.compile(program.stem)(images).numpy()) <= 0.75
        monkeypatch.setattr(stem, "split_exact", lambda *a, **k: None)
        plain = Int8Program(model, *norm).eval()
        assert not plain.stem.exact
        assert stem_error(model.conv1, model.bn1, images, norm, plain.stem(images).numpy()) > 1.0
        assert (plain(images).argmax(1) == program(images).argmax(1)).float().mean() > 0.9  # the same model


def test_what_it_cannot_take_is_one_line():
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10))  # the float residual
    with pytest.raises(ExportError, match="quant.residual = int"):
        Int8Program(model.eval(), *normalisation(MEAN, STD))


@needs_vnni
def test_eval_backend_torch_int8_on_the_committed_artifact(cifar_root, capsys):
    art = ROOT / "results/deploy/qkd_logit-int8stream-s0.vaqkd.safetensors"
    res = {}
    for backend in ("torch", "torch-int8"):
        capsys.readouterr()
        assert main(["eval", str(art), "--backend", backend, "--json", "--data-root", str(cifar_root)]) == 0
        res[backend] = json.loads(capsys.readouterr().out)
    assert res["torch-int8"]["backend"] == "torch-int8"
    assert abs(res["torch-int8"]["top1"] - res["torch"]["top1"]) <= 1.0, res  # 100 synthetic images
    capsys.readouterr()
    one_line(capsys, ["eval", str(ROOT / "results/deploy/qkd_feature-s0-deploy.vaqkd.safetensors"), "--backend",
                      "torch-int8", "--data-root", str(cifar_root)], "quant.residual = int")  # fmt: skip
