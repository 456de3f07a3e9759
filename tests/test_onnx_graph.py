"""The ONNX export from the traced graph: every model family, uint8 input normalised as the loader does, the
integer-residual student with no float convolution but the FP32 stem, and what does not export named in a line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import one_line_error as one_line
from conftest import stem_error
from vaqkd.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import IR_VERSION, build_onnx, normalisation, ort_logits, session  # noqa: E402
from vaqkd.models import create_model  # noqa: E402
from vaqkd.quant import calibrate, quantize, quantize_student  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _optimized_ops(proto, tmp_path) -> list[str]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # the QDQ fusions, no layouts
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def _sequential():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))  # fmt: skip


def _trained_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("family", ["resnet20", "wrn_16_2", "sequential"])
@pytest.mark.parametrize("quantized", [False, True])
def test_every_family_exports_and_agrees(family, quantized):
    torch.manual_seed(0)
    model = _trained_bn(_sequential() if family == "sequential" else create_model(family, 10))
    x = torch.randn(32, 3, 32, 32)
    if quantized:
        quantize(model, 2, 2)
        calibrate(model, [x])
    model.eval()
    with torch.no_grad():
        ref = model(x)
    proto = build_onnx(model)
    assert proto.ir_version == IR_VERSION == 10
    out = ort_logits(session(proto.SerializeToString()), x)
    if not quantized:
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    else:  # float rounding may move a code at a boundary; nearly all predictions and logits agree
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
        assert (out - ref).abs().median() < 1e-3


def test_the_graph_takes_uint8_pixels_and_normalises_as_the_loader():
    """The same uint8 images through the graph and through the loader's arithmetic + PyTorch: the logits agree to
    float rounding, so a consumer feeds pixels and needs no formula of its own."""
    from vaqkd.data.loader import DeviceLoader

    torch.manual_seed(0)
    model = _trained_bn(create_model("resnet20", 10)).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(16, dtype=torch.long), 16, MEAN, STD, torch.device("cpu"), train=False)
    x, _, _ = next(loader.batches(0))
    m255, s255 = normalisation(MEAN, STD)
    assert np.array_equal(m255, loader.mean.flatten().numpy()) and np.array_equal(s255, loader.std.flatten().numpy())
    proto = build_onnx(model, normalise=(m255, s255))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(ort_logits(session(proto.SerializeToString()), images), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_an_integer_residual_student_has_no_float_conv_but_the_stem(bits, tmp_path):
    """Every block conv a QLinearConv, every add but the last (which feeds the float pool) a QLinearAdd; the block
    outputs equal PyTorch's after all 9 blocks (codes moved by float rounding: none on this input)."""
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=bits)
    x = torch.randn(64, 3, 32, 32)
    calibrate(model, [x])
    _trained_bn(model).eval()
    ops = _optimized_ops(build_onnx(model), tmp_path)
    float_convs = ops.count("Conv") + ops.count("FusedConv")
    assert float_convs == 1 and ops.count("QLinearConv") == 18 and ops.count("QLinearAdd") == 8, ops
    out = {}
    model.layer3.register_forward_hook(lambda m, i, o: out.__setitem__("ref", o))
    with torch.no_grad():
        logits = model(x)
    got = ort_logits(session(build_onnx(model, stop_after="layer3").SerializeToString()), x)
    moved = ((got - out["ref"]).abs() > 1e-4).float().mean().item()
    assert moved < 1e-3, moved
    assert (ort_logits(session(build_onnx(model).SerializeToString()), x).argmax(1) == logits.argmax(1)).all()


@pytest.mark.parametrize("kind", ["fp32", "w2a2", "int"])
def test_the_profilers_conv_macs_from_the_graph_equal_the_models_layer_table(kind, monkeypatch):
    """benchmarks/ort_profile.py counts multiply-adds from the exported graph's shapes (float Conv, and the
    integer graph's convs behind their DequantizeLinear weights); `metrics.size.layer_table` counts them from a
    dry run of the PyTorch model: the two agree, and of the integer residual only the FP32 stem counts as float
    (three times: computed exactly, as two convs on 3 and 6 channels, `Builder.pixels_conv`)."""
    from pathlib import Path

    from vaqkd.metrics.size import layer_table

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ort_profile import conv_macs

    torch.manual_seed(0)
    model = create_model("resnet20", 10)
    if kind != "fp32":
        model = quantize_student(model, residual="int" if kind == "int" else "float")
        calibrate(model, [torch.randn(8, 3, 32, 32)])
    convs = [r for r in layer_table(model.eval()) if r["kind"] != "Linear" and "fc" not in r["name"]]
    expected = sum(r["macs"] for r in convs)
    assert expected > 40_000_000  # ResNet-20: 40.55 M multiply-adds in its convs
    macs = conv_macs(build_onnx(model, normalise=normalisation(MEAN, STD)).SerializeToString())
    stem = convs[0]["macs"]  # 3 -> 16 channels, 3x3, 32x32: the FP32 first conv of the quantized students
    assert stem == 16 * 32 * 32 * 27
    assert macs["integer"] + macs["float"] == expected + (2 * stem if kind == "int" else 0)
    second = sum(r["macs"] for r in convs if r["name"].endswith("conv2"))  # float residual: they feed a float add
    assert macs["float"] == {"fp32": expected, "w2a2": stem + second, "int": 3 * stem}[kind]


def _wide_stream_student(seed=0):
    torch.manual_seed(seed)
    model = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=8)
    calibrate(model, [torch.randn(64, 3, 32, 32)])
    return _trained_bn(model, seed).eval()


def _stem_output(proto):
    """The graph cut at its first QuantizeLinear's input: the stem's float output, which the stream codes quantize."""
    first_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    return onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model(["input"], [first_q.input[0]])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_integer_residual_stem_is_computed_within_half_an_ulp_of_exact(runtime, monkeypatch):
    """The stem's output is quantized to the first stream codes, and a float32 conv summing in its own order moves
    some of them (on the full-data artifact nearly every disagreement with PyTorch began there). Exported with
    `normalise`, the stem is the exact split of `Builder.pixels_conv`: every output within ~half an ulp of the
    float64 value of the model's own arithmetic (the loader's float32 pixels, conv, BatchNorm) — the ulp of the
    dot product's magnitude, sum |n·w| + |shift| — in both runtimes; the plain float32 conv is not."""
    from vaqkd.deploy import onnx_build
    from vaqkd.deploy.runtimes import compile_graph

    if runtime == "openvino":
        pytest.importorskip("openvino")
    model = _wide_stream_student()
    norm = normalisation(MEAN, STD)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def error(proto):
        run = compile_graph(runtime, _stem_output(proto).SerializeToString(), threads=1)
        return stem_error(model.conv1, model.bn1, x, norm, run(x.numpy()))

    proto = build_onnx(model, normalise=norm)
    assert [n.op_type for n in proto.graph.node].count("Gather") == 1  # the pixel table
    assert error(proto) <= 0.75
    plain = build_onnx(model, normalise=norm, exact_stem=False)  # the plain float32 conv
    assert [n.op_type for n in plain.graph.node].count("Gather") == 0
    assert error(plain) > 1.0
    monkeypatch.setattr(onnx_build, "exact_parts", lambda *a: None)  # weights that do not split: the plain conv
    assert [n.op_type for n in build_onnx(model, normalise=norm).graph.node].count("Gather") == 0


def test_pixel_table_and_the_exact_weight_split():
    """The table holds the loader's float32 values and splits exactly as the graph splits them (round to the 2^e
    grid, subtract); a float32 conv of the weights' high part on inputs of PIXEL_BITS-bit integers times 2^e sums
    exactly (equal to float64), the low part is the rest."""
    from vaqkd.deploy.stem import PIXEL_BITS, pixel_table, split_exact

    norm = normalisation(MEAN, STD)
    n, e = pixel_table(norm)
    x = torch.arange(256, dtype=torch.float32).view(1, 256).expand(3, 256)
    loader = ((x - torch.from_numpy(norm[0]).view(3, 1)) / torch.from_numpy(norm[1]).view(3, 1)).numpy()
    assert np.array_equal(n, loader)
    n_hi = np.round(n * np.float32(2.0**-e)) * np.float32(2.0**e)
    n_lo = n - n_hi
    assert np.array_equal(n_hi.astype(np.float64) + n_lo, n.astype(np.float64))
    a = n_hi / 2.0**e
    assert np.array_equal(a, np.round(a)) and 2 ** (PIXEL_BITS - 1) < np.abs(a).max() <= 2**PIXEL_BITS
    w = torch.randn(16, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).numpy() * 0.3
    hi, lo, unit = split_exact(w)
    assert np.abs(hi.astype(np.float64) + lo - w).max() <= np.abs(w).max() * 2.0**-30
    assert np.abs(hi / unit[:, None, None, None]).max() <= 2**23 / (27 * 2**PIXEL_BITS)
    codes = torch.randint(-(2**PIXEL_BITS), 2**PIXEL_BITS + 1, (8, 3, 32, 32)).double() * 2.0**e
    f32 = F.conv2d(codes.float(), torch.from_numpy(hi), padding=1).double()
    assert torch.equal(f32, F.conv2d(codes, torch.from_numpy(hi).double(), padding=1))
    assert split_exact(np.ones((4, 4096, 3, 3))) is None  # a fan-in too wide for the split to keep 4 bits


@pytest.mark.parametrize("first_last", ["8", "same"])
def test_eight_bit_edge_layers_and_a_switched_off_channel_keep_the_answers_after_orts_optimiser(first_last, tmp_path):
    """W8A8 stem and classifier (`first_last = "8"`): their 8-bit x 8-bit products do not fit ORT's int16 pairs,
    and ORT's optimiser made them integer kernels even from float weights (argmax agreement 52-81 %); they stay
    float behind a sealed input. A channel whose BatchNorm γ is ~0 has a shift no int32 holds on its grid (it
    wrapped to -2^31): its conv stays float too. The reference graph (`integer=False`) survives the optimiser."""
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10), first_last=first_last, residual="int", residual_bits=2)
    x = torch.randn(128, 3, 32, 32)
    calibrate(model, [x])
    _trained_bn(model).eval()
    off = model.layer2[0].bn1
    off.weight.data[:2] = torch.tensor([1e-6, 0.0])
    off.bias.data[:2] = 0.3
    with torch.no_grad():
        ref = model(x)
    for integer in (True, False):
        got = ort_logits(session(build_onnx(model, integer=integer).SerializeToString()), x)  # every optimisation
        assert (got - ref).abs().max() < 1e-4, (integer, (got - ref).abs().max())
    ops = _optimized_ops(build_onnx(model), tmp_path)
    float_convs = ops.count("Conv") + ops.count("FusedConv")
    want = (2, 17) if first_last == "8" else (1, 18)  # float convs: the switched-off one (and the W8A8 stem)
    assert (float_convs, ops.count("QLinearConv")) == want, ops
    out = {}
    model.layer1.register_forward_hook(lambda m, i, o: out.__setitem__("ref", o))
    with torch.no_grad():
        model(x)
    stage = ort_logits(session(build_onnx(model, stop_after="layer1").SerializeToString()), x)
    assert stage.min() >= 0 and (stage - out["ref"]).abs().max() < 1e-4  # a stage's output after its ReLU


@pytest.mark.parametrize("bits", [2, 8])
def test_openvino_computes_the_integer_residual_graph_as_pytorch(bits):
    """OpenVINO fuses conv, requantization, add and the next quantizer into one integer conv; with the
    requantization written once it left it out (2 % of the 2-bit stream's codes moved after the first block).
    The exporter repeats that Q -> DQ (`add_operand`): every block output equals PyTorch's after all 9 blocks."""
    from vaqkd.deploy.runtimes import compile_graph

    pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=bits)
    x = torch.randn(64, 3, 32, 32)
    calibrate(model, [x])
    _trained_bn(model).eval()
    out = {}
    model.layer3.register_forward_hook(lambda m, i, o: out.__setitem__("ref", o))
    with torch.no_grad():
        model(x)
    run = compile_graph("openvino", build_onnx(model, stop_after="layer3").SerializeToString(), threads=1)
    got = torch.from_numpy(run(x.numpy()))
    moved = ((got - out["ref"]).abs() > 1e-4).float().mean().item()
    assert moved < 1e-3, moved


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_streams_split_the_batch_and_keep_every_images_logits(runtime):
    """compile_graph(streams=2): two instances of the integer-residual graph each take a part of the batch
    (odd sizes and a batch of one included); every image's logits are those of the one-instance graph."""
    from vaqkd.deploy.runtimes import compile_graph

    if runtime == "openvino":
        pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=8)
    calibrate(model, [torch.randn(32, 3, 32, 32)])
    graph = build_onnx(_trained_bn(model).eval(), normalise=normalisation(MEAN, STD)).SerializeToString()
    one, two = compile_graph(runtime, graph, threads=2), compile_graph(runtime, graph, threads=2, streams=2)
    x = np.random.default_rng(0).integers(0, 256, (37, 3, 32, 32), dtype=np.uint8)
    for batch in (x, x[:1], x[:2]):
        assert np.array_equal(two(batch), one(batch)), len(batch)
    assert two.input_type == "uint8" and two.streams == 2
    for threads in (0, 1, 3):
        with pytest.raises(ValueError, match=rf"^streams=2 with threads={threads}: streams split the threads"):
            compile_graph(runtime, graph, threads=threads, streams=2)


def test_streams_run_each_part_on_its_own_instance_at_once():
    """The split itself: every instance gets one contiguous part (no empty ones), the parts run concurrently
    (each instance waits until all have started: a sequential split would time out), logits in order."""
    import threading

    from vaqkd.deploy.runtimes import _split

    started, seen = threading.Barrier(3, timeout=10), []

    def instance(i):
        def run(x):
            seen.append((i, x[:, 0, 0, 0].tolist()))
            started.wait()
            return x[:, :1, 0, 0].astype(np.float32)

        run.input_type = "uint8"
        return run

    run = _split([instance(i) for i in range(3)])
    x = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1).repeat(3, 1)
    assert run(x)[:, 0].tolist() == list(range(7))
    assert sorted(seen) == [(0, [0, 1, 2]), (1, [3, 4]), (2, [5, 6])]


def test_the_float_residual_student_keeps_its_float_convs(tmp_path):
    """The paper's arithmetic (float residual): the second conv of every block feeds a float add, so it stays a
    float conv; the integer residual is what removes them (the test above)."""
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10))
    calibrate(model, [torch.randn(32, 3, 32, 32)])
    ops = _optimized_ops(build_onnx(model.eval()), tmp_path)
    assert ops.count("QLinearConv") == 9 and ops.count("Conv") + ops.count("FusedConv") == 10  # 9 + the stem


def test_what_does_not_export_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ExportError, match=r"^1 \(GELU\): no ONNX mapping for gelu$"):
        build_onnx(model.eval())


def test_export_pretrained_weights_and_evaluate_the_graph_from_the_cli(tmp_path, cifar_root, capsys):
    out = tmp_path / "teacher.onnx"
    assert main(["export", "pretrained", "--format", "onnx", "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["dataset"] == "cifar100" and "uint8" in meta["input"] and proto.ir_version == 10
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--data-root", str(cifar_root)]) == 0
    assert '"backend": "onnxruntime"' in capsys.readouterr().out
    one_line(capsys, ["export", "pretrained:nope", "--format", "onnx", "--out", str(tmp_path / "x.onnx")],
             "pretrained:nope", "not a run directory, a packed artifact or weights")


def test_a_packed_artifact_runs_in_onnx_runtime_and_openvino_from_the_cli(tmp_path, cifar_root, capsys):
    """The artifact reaches ONNX from the CLI (export, and eval --backend on the artifact itself). ORT gives
    PyTorch's top-1 (real-image agreement is tested on the committed artifact in test_deploy); OpenVINO runs and
    reports a top-1 (a float-residual graph's float convs in OpenVINO's own order of summation: see
    results/deploy for what it agrees on)."""
    import json

    from vaqkd.deploy import pack_model, save_artifact

    torch.manual_seed(0)
    model = quantize_student(create_model("resnet32", 100))
    calibrate(model, [torch.randn(32, 3, 32, 32)])
    tensors, summary = pack_model(model)
    header = {"format": "vaqkd-packed", "version": 2, "arch": "resnet32", "num_classes": 100, "dataset": "cifar100",
              "image_size": 32, "mean": list(MEAN), "std": list(STD), "source_run": "test", "git_sha": None,
              "top1_last": None, "quant": {"w_bits": 2, "a_bits": 2, "weight": "lsq", "act": "lsq",
                                           "per_channel": False, "first_last": "fp32"}, **summary}  # fmt: skip
    art = save_artifact(tmp_path / "m.vaqkd.safetensors", tensors, header)
    assert main(["export", str(art), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    res = {}
    for backend in ("torch", "onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        capsys.readouterr()
        assert main(["eval", str(art), "--backend", backend, "--json", "--data-root", str(cifar_root)]) == 0
        res[backend] = json.loads(capsys.readouterr().out)
    assert res["onnxruntime"]["top1"] == res["torch"]["top1"], res
    assert res["openvino"]["backend"] == "openvino" and 0 <= res["openvino"]["top1"] <= 100


def _int_student(bits):
    torch.manual_seed(0)
    model = quantize_student(create_model("resnet20", 10), residual="int", residual_bits=bits)
    calibrate(model, [torch.randn(32, 3, 32, 32)])
    return build_onnx(_trained_bn(model).eval(), normalise=normalisation(MEAN, STD)).SerializeToString()


@pytest.mark.parametrize("bits", [2, 8])
def test_ort_runs_the_integer_body_channels_last_bit_for_bit(bits, tmp_path):
    """`ort_layout.channels_last` on ORT's extended-level graph of an integer-residual ResNet-20 (strided
    shortcuts: a Slice and a Pad on codes): every QLinearConv in NHWC, three transposes left (two on the codes
    after the stem, one before the pool), the logits bit for bit those of the graph it came from; compile_graph
    runs it with ORT's other optimizations (and says so), giving ORT's own graph's logits bit for bit."""
    from vaqkd.deploy.ort_layout import channels_last
    from vaqkd.deploy.runtimes import compile_graph

    graph = _int_student(bits)
    ext = session(graph, 1, optimize="extended", save_to=tmp_path / "ext.onnx")
    fast = channels_last(onnx.load(str(tmp_path / "ext.onnx")))
    convs = [n for n in fast.graph.node if n.op_type == "QLinearConv"]
    assert len(convs) == 18 and all(n.domain == "com.microsoft" for n in convs)
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in convs for a in n.attribute if a.name == "channels_last")
    assert [n.op_type for n in fast.graph.node].count("Transpose") == 3
    x = np.random.default_rng(0).integers(0, 256, (37, 3, 32, 32), dtype=np.uint8)
    want = ext.run(None, {"input": x})[0]
    got = session(fast.SerializeToString(), 1, optimize=False).run(None, {"input": x})[0]
    assert np.array_equal(got, want)
    own = session(graph, 1).run(None, {"input": x})[0]  # ORT's own graph: what the backend must give
    run = compile_graph("onnxruntime", graph, threads=1)
    assert np.array_equal(run(x), own) and np.array_equal(run(x[:3]), own[:3]) and run.layout == "channels-last"
    assert compile_graph("onnxruntime", graph, threads=1, channels_last=False).layout == "ort"


def test_ort_channels_last_leaves_a_float_graph_and_falls_back_from_a_wrong_rewrite(monkeypatch, tmp_path):
    """An FP32 graph has no integer conv: nothing to rewrite, ORT's own layout runs. A rewrite whose logits
    differ from the graph it came from is used for no batch: the first batch's logits are the reference's, a
    warning says why, and ORT's layout runs from then on."""
    from vaqkd.deploy import ort_layout
    from vaqkd.deploy.runtimes import compile_graph

    fp32 = build_onnx(_trained_bn(create_model("resnet20", 10)).eval(), normalise=normalisation(MEAN, STD))
    session(fp32.SerializeToString(), 1, optimize="extended", save_to=tmp_path / "ext.onnx")
    assert ort_layout.channels_last(onnx.load(str(tmp_path / "ext.onnx"))) is None
    assert compile_graph("onnxruntime", fp32.SerializeToString(), threads=1).layout == "ort"
    bad = tmp_path / "bad.onnx"  # a damaged file: its one-line error, no warning about the rewrite first
    bad.write_bytes(b"not an onnx model")
    import warnings

    from vaqkd.errors import RunFileError

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RunFileError, match="bad.onnx: damaged or not an ONNX model"):
            compile_graph("onnxruntime", bad, threads=1)

    real = ort_layout.channels_last

    def wrong(model):  # the pass with the classifier's bias moved: logits that are not the graph's
        m = real(model)
        gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
        bias = next(i for i in m.graph.initializer if i.name == gemm.input[2])
        bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1.0, bias.name))
        return m

    graph = _int_student(8)
    x = np.random.default_rng(1).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    want = session(graph, 1).run(None, {"input": x})[0]  # ORT's own graph
    monkeypatch.setattr(ort_layout, "channels_last", wrong)
    run = compile_graph("onnxruntime", graph, threads=1)
    assert run.layout == "channels-last"
    with pytest.warns(UserWarning, match="channels-last graph is not used .*logits differ"):
        first = run(x)
    assert np.array_equal(first, want) and np.array_equal(run(x), want) and run.layout == "ort"
    # two instances: the graph is rewritten once for both, each checks its own first part
    calls = []

    def counted(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(ort_layout, "channels_last", counted)
    two = compile_graph("onnxruntime", graph, threads=2, streams=2)
    assert len(calls) == 1 and two.layout == "channels-last"
    assert np.array_equal(two(x), want) and two.layout == "channels-last"
    from vaqkd.deploy.runtimes import _layout

    one_each = [lambda x: x, lambda x: x]
    one_each[0].layout, one_each[1].layout = "channels-last", "ort"
    assert _layout(one_each) == "mixed"


def _tiny(nodes, inits, shape, opset=21):
    """A small graph on uint8 input x of `shape` around one QLinearConv (1x1, 4 -> 4 channels) named c."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    conv = [nh.from_array(np.float32(0.05), "xs"), nh.from_array(np.uint8(128), "xz"),
            nh.from_array(rng.integers(-3, 4, (4, 4, 1, 1)).astype(np.int8), "w"),
            nh.from_array(np.float32(0.1), "ws"), nh.from_array(np.int8(0), "wz"),
            nh.from_array(np.float32(0.2), "ys"), nh.from_array(np.uint8(100), "yz")]  # fmt: skip
    q = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["c"])
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, shape)
    g = helper.make_graph([q, *nodes], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          conv + [nh.from_array(np.asarray(v), k) for k, v in inits.items()])  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _edge_cases():
    from onnx import helper

    dq = helper.make_node("DequantizeLinear", ["s", "ys", "yz"], ["d"])
    gap = helper.make_node("GlobalAveragePool", ["d"], ["y"])
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    branch = lambda o: helper.make_graph([helper.make_node("DequantizeLinear", ["c", "ys", "yz"], [o])], o, [],  # noqa: E731
                                         [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)])  # fmt: skip
    return {  # name: (nodes, constants, input shape, what the pass must do)
        "slice H and W, negative axes": ([helper.make_node("Slice", ["c", "st", "en", "ax"], ["s"]), dq, gap],
                                         {"st": i64(0, 1), "en": i64(5, 4), "ax": i64(-1, -2)}, [2, 4, 6, 7], "same"),
        "slice channels and H": ([helper.make_node("Slice", ["c", "st", "en", "ax", "sp"], ["s"]), dq, gap],
                                 {"st": i64(1, 0), "en": i64(3, 5), "ax": i64(1, 2), "sp": i64(1, 2)}, [2, 4, 6, 7],
                                 "same"),
        "pad H and W": ([helper.make_node("Pad", ["c", "pd", "pz"], ["s"]), dq, gap],
                        {"pd": i64(0, 0, 1, 0, 0, 0, 3, 2), "pz": np.uint8(100)}, [2, 4, 6, 7], "same"),
        "pad with an axes input": ([helper.make_node("Pad", ["c", "pd", "pz", "pax"], ["s"]), dq, gap],
                                   {"pd": i64(1, 0, 2, 0), "pz": np.uint8(100), "pax": i64(1, 3)}, [2, 4, 6, 7],
                                   "same"),
        "per-channel add": ([helper.make_node("Identity", ["c"], ["s"]), dq,
                             helper.make_node("Add", ["d", "pc"], ["a"]),
                             helper.make_node("GlobalAveragePool", ["a"], ["y"])],
                            {"pc": np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)}, [2, 4, 6, 7], "same"),
        "per-axis dequantize": ([helper.make_node("DequantizeLinear", ["c", "ps", "pz4"], ["d"], axis=1), gap],
                                {"ps": np.linspace(0.1, 0.4, 4, dtype=np.float32), "pz4": np.full(4, 100, np.uint8)},
                                [2, 4, 6, 7], "same"),
        "nhwc graph output": ([helper.make_node("DequantizeLinear", ["c", "ys", "yz"], ["y"])], {}, [2, 4, 6, 7],
                              None),
        "input of unknown shape": ([helper.make_node("Identity", ["c"], ["s"]), dq, gap], {}, None, None),
        "subgraph": ([helper.make_node("If", ["cond"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                     {"cond": np.array(True)}, [2, 4, 6, 7], None),
    }


@pytest.mark.parametrize("case", list(_edge_cases()))
def test_channels_last_pass_on_edge_cases(case):
    """Small graphs around one QLinearConv, with H != W so that a swapped axis shows: Slice (negative axes, steps,
    the channel axis), Pad (moved, or with an axes input: left NCHW), a per-channel constant and a per-axis
    dequantize (read in NCHW): the rewrite computes the same as the graph, bit for bit. What the pass does not
    reason about (an NHWC graph output, an input of unknown rank, a subgraph) it declines."""
    from vaqkd.deploy.ort_layout import channels_last

    nodes, inits, shape, expect = _edge_cases()[case]
    model = _tiny(nodes, inits, shape)
    fast = channels_last(model)
    if expect is None:
        assert fast is None
        return
    x = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    want = session(model.SerializeToString(), 1, optimize=False).run(None, {"x": x})[0]
    got = session(fast.SerializeToString(), 1, optimize=False).run(None, {"x": x})[0]
    assert got.shape == want.shape and np.array_equal(got, want)
    assert any(n.op_type == "QLinearConv" and n.domain == "com.microsoft" for n in fast.graph.node)


def _pair(s_a, z_a, s_c, z_c, dtype):
    """DequantizeLinear(s_a, z_a) -> QuantizeLinear(s_c, z_c) on a vector of all 256 codes of `dtype`."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    t = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    nodes = [helper.make_node("DequantizeLinear", ["x", "sa", "za"], ["d"]),
             helper.make_node("QuantizeLinear", ["d", "sc", "zc"], ["y"])]  # fmt: skip
    inits = [nh.from_array(np.float32(s_a), "sa"), nh.from_array(np.array(z_a, dtype), "za"),
             nh.from_array(np.float32(s_c), "sc"), nh.from_array(np.array(z_c, dtype), "zc")]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [256])],
                          [helper.make_tensor_value_info("y", t, [256])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("s_a, z_a, s_c, z_c, dtype, same", [
    (0.3, 0, 0.3 / 43, 0, np.uint8, True),  # the input spread: an integer ratio
    (0.1, 128, 0.7, 128, np.uint8, True),  # signed codes, a coarser step
    (0.37, 3, 0.05, 250, np.uint8, True),
    (0.1, 0, 0.2, 0, np.uint8, False),  # ratio 0.5: (x·0.1)/0.2 and x·0.5 round ties apart
    (0.1, 0, 0.2, 0, np.int8, False),
    (0.640592098236084, 69, 2.562370777130127, 19, np.uint8, False),  # QLinearMul adds z_c in float before rounding
    (0.012711115181446075, 13, 0.010168885812163353, -120, np.int8, False),
    (2.0**24, 0, 1.0, 0, np.uint8, False),  # x·ratio past 2^31: x86's conversion gives INT_MIN, not 255
    (0.6492641568183899, 241, 0.1855039894580841, 254, np.uint8, False),  # differs only once z_a is counted
])  # fmt: skip
def test_requantize_pairs_rewrites_only_where_ort_gives_the_same_codes(s_a, z_a, s_c, z_c, dtype, same):
    """`requantize_pairs` writes a DQ -> Q pair as one QLinearMul by 1 exactly where `_same_codes` says both give
    every code alike; forced onto every pair, ORT's QLinearMul agrees with ORT's DQ -> Q on all 256 codes exactly
    where `_same_codes` said so (its model of the two kernels holds on these cases, near-ties and overflow
    included), and the rewrite is bit for bit."""
    from vaqkd.deploy import ort_layout

    m = _pair(s_a, z_a, s_c, z_c, dtype)
    x = (np.arange(256) - (0 if dtype == np.uint8 else 128)).astype(dtype)
    want = session(m.SerializeToString(), 1, optimize=False).run(None, {"x": x})[0]
    assert ort_layout._same_codes(s_a, z_a, s_c, z_c, np.dtype(dtype)) == same
    r = ort_layout.requantize_pairs(m)
    assert [n.op_type for n in r.graph.node] == (["QLinearMul"] if same else ["DequantizeLinear", "QuantizeLinear"])
    if same:
        assert np.array_equal(session(r.SerializeToString(), 1, optimize=False).run(None, {"x": x})[0], want)
    real = ort_layout._same_codes
    try:
        ort_layout._same_codes = lambda *a: True
        forced = ort_layout.requantize_pairs(m)
    finally:
        ort_layout._same_codes = real
    got = session(forced.SerializeToString(), 1, optimize=False).run(None, {"x": x})[0]
    assert np.array_equal(got, want) == same


def test_requantize_pairs_on_graph_edge_cases():
    """A DequantizeLinear also read elsewhere (a graph output, a Relu, a second Q) stays for those readers; unnamed
    Q nodes and an initializer already called like the pass's constants get names of their own; scales and zero
    points of shape [1] are read (as scalars: QLinearMul refuses [1]); float16 scales and a uint8 -> int8 pair are left
    alone (QLinearMul takes float32 scales and one type). Each result computes
    what the graph computes, in ORT."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    from vaqkd.deploy.ort_layout import requantize_pairs

    x = np.arange(256).astype(np.uint8)

    def check(m, ops):
        r = requantize_pairs(m)
        assert sorted(n.op_type for n in r.graph.node) == sorted(ops)
        names = [n.name for n in r.graph.node if n.name] + [i.name for i in r.graph.initializer]
        assert len(names) == len(set(names))
        want = session(m.SerializeToString(), 1, optimize=False).run(None, {"x": x})
        got = session(r.SerializeToString(), 1, optimize=False).run(None, {"x": x})
        assert all(np.array_equal(a, b) for a, b in zip(want, got))

    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)
    m.graph.output.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, [256]))
    check(m, ["DequantizeLinear", "QLinearMul"])
    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)
    m.graph.node.append(helper.make_node("Relu", ["d"], ["r"]))
    m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [256]))
    check(m, ["DequantizeLinear", "QLinearMul", "Relu"])
    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)  # two unnamed Qs on one DQ, and a name the pass would pick
    m.graph.node.append(helper.make_node("QuantizeLinear", ["d", "sc", "zero_uint8"], ["y2"]))
    m.graph.initializer.append(nh.from_array(np.array(7, np.uint8), "zero_uint8"))
    m.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.UINT8, [256]))
    check(m, ["QLinearMul", "QLinearMul"])
    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)
    for init in m.graph.initializer:
        init.CopyFrom(nh.from_array(nh.to_array(init).reshape(1), init.name))
    check(m, ["QLinearMul"])
    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)
    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)  # uint8 codes requantized to int8: QLinearMul takes one type
    for init in m.graph.initializer:
        if init.name == "zc":
            init.CopyFrom(nh.from_array(np.int8(0), "zc"))
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT8
    check(m, ["DequantizeLinear", "QuantizeLinear"])
    m = _pair(0.3, 0, 0.3 / 43, 0, np.uint8)
    for init in m.graph.initializer:
        if init.name in ("sa", "sc"):
            init.CopyFrom(nh.from_array(nh.to_array(init).astype(np.float16), init.name))
    check(m, ["DequantizeLinear", "QuantizeLinear"])


@pytest.mark.parametrize("bits", [2, 8])
def test_ort_backend_requantizes_in_codes(bits, tmp_path):
    """ORT's extended-level graph of an integer-residual student: every DQ -> Q pair (the input spread before each
    integer conv; with an 8-bit stream also its reading as 2-bit codes) becomes a QLinearMul, no float tensor is
    left between two integer ops, and the logits are bit for bit those of the graph it came from."""
    from vaqkd.deploy.ort_layout import requantize_pairs

    graph = _int_student(bits)
    ext = session(graph, 1, optimize="extended", save_to=tmp_path / "ext.onnx")
    before = onnx.load(str(tmp_path / "ext.onnx"))
    after = requantize_pairs(before)
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    made = {o: n.op_type for n in before.graph.node for o in n.output}
    pairs = sum(n.op_type == "QuantizeLinear" and made.get(n.input[0]) == "DequantizeLinear" for n in before.graph.node)
    assert pairs >= 18 and ops(after).count("QLinearMul") == pairs
    assert ops(after).count("DequantizeLinear") == ops(before).count("DequantizeLinear") - pairs
    x = np.random.default_rng(3).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8)
    want = ext.run(None, {"input": x})[0]
    assert np.array_equal(session(after.SerializeToString(), 1, optimize=False).run(None, {"input": x})[0], want)
    from vaqkd.deploy.ort_layout import channels_last_graph

    backend = onnx.load_from_string(channels_last_graph(graph))  # what compile_graph loads: both passes
    assert [n.op_type for n in backend.graph.node].count("QLinearMul") == pairs


def _graph_of(path, nodes, inits=(), batch="N", out=("N", 100), meta: dict | None = None):
    """A graph of uint8 images (batch, 3, H, W) in and float logits of shape `out` out, computing `nodes`; by
    default it declares what `vaqkd export` writes (a free batch, (N, 100) logits)."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input", TensorProto.UINT8, [batch, 3, "H", "W"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out))
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], [logits], initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", 21)])  # fmt: skip
    model.ir_version = 10
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    path.write_bytes(model.SerializeToString())
    return path


def _tiny_graph(path, fixed_batch: bool = False, rank2_out: bool = True, meta: dict | None = None):
    from onnx import TensorProto, helper

    n = 1 if fixed_batch else "N"
    nodes = [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT)]
    if rank2_out:
        nodes += [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])]
        return _graph_of(path, nodes, batch=n, out=(n, 3), meta=meta)
    nodes += [helper.make_node("Identity", ["x"], ["logits"])]
    return _graph_of(path, nodes, batch=n, out=(n, 3, "H", "W"), meta=meta)


@pytest.mark.parametrize("kind,culprit", [
    ("fixed batch", "not an image classifier graph of vaqkd export"),
    ("rank-4 output", "not an image classifier graph of vaqkd export"),
    ("image_size", "metadata image_size='abc' is not an integer"),
    ("dataset", "metadata dataset='bogus' unknown"),
])  # fmt: skip
def test_a_foreign_or_edited_onnx_graph_is_one_line_naming_what_does_not_fit(kind, culprit, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    meta = {"image_size": {"image_size": "abc"}, "dataset": {"dataset": "bogus"}}.get(kind)
    graph = _tiny_graph(tmp_path / "g.onnx", kind == "fixed batch", kind != "rank-4 output", meta)
    assert main(["eval", str(graph), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and culprit in err, err


@pytest.mark.parametrize("kind,culprit", [
    ("one row for the batch", "gives logits of shape (1, 100) for a batch of 200 images"),
    ("fails while running", "the runtime failed running it"),
    ("other classes", "gives 3 classes; the test split has 100"),
])  # fmt: skip
def test_a_graph_that_misbehaves_while_running_is_one_line_naming_it(kind, culprit, cifar_root, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    cast = helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT)
    pool = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
    widen = numpy_helper.from_array(np.ones((3, 100), np.float32), "w")
    if kind == "one row for the batch":  # the mean over the batch: (1, 100), once broadcast against every label
        nodes = [cast, *pool, helper.make_node("MatMul", ["f", "w"], ["m"]),
                 helper.make_node("ReduceMean", ["m", "ax"], ["logits"], keepdims=1)]  # fmt: skip
        inits = [widen, numpy_helper.from_array(np.array([0], np.int64), "ax")]
    elif kind == "other classes":  # a 3-class graph on CIFAR-100: its top-1 would count labels 0-2 only
        nodes, inits = [cast, *pool, helper.make_node("Identity", ["f"], ["logits"])], []
    else:  # 3·32·32 values an image do not reshape into rows of 7
        nodes = [cast, helper.make_node("Reshape", ["x", "shape"], ["r"]),
                 helper.make_node("Identity", ["r"], ["logits"])]  # fmt: skip
        inits = [numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")]
    graph = _graph_of(tmp_path / "g.onnx", nodes, inits)
    assert main(["eval", str(graph), "--data-root", str(cifar_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and str(graph) in err and culprit in err, err
