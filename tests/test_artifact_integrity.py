"""Nothing damaged passes: a packed artifact carries the sha256 of its tensors and header, every header field is
checked, and a damaged or tampered file (or ONNX graph) is one line naming the file and what is damaged."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_line_error as one_line
from vaqkd.deploy import load, pack_model, read_header, save_artifact
from vaqkd.deploy.integrity import HASH_KEY, HEADER_KEY, seal, sha256, tensor_sha256
from vaqkd.errors import RunFileError

ROOT = Path(__file__).resolve().parents[1]
CIFAR100 = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A W2A2 resnet20 (calibrated on noise, BatchNorm statistics from it) packed as `vaqkd export` packs it."""
    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize

    torch.manual_seed(0)
    model = quantize(create_model("resnet20", 100), 2, 2)
    calibrate(model, [torch.randn(16, 3, 32, 32)])
    tensors, summary = pack_model(model.eval())
    header = {"format": "vaqkd-packed", "version": 2, "arch": "resnet20", "num_classes": 100, "dataset": "cifar100",
              "image_size": 32, **CIFAR100, "quant": {"w_bits": 2, "a_bits": 2, "weight": "lsq", "act": "lsq",
              "per_channel": False, "first_last": "fp32"}, **summary, "source_run": "runs/x", "git_sha": "abc",
              "top1_last": 1.0}  # fmt: skip
    out = save_artifact(tmp_path_factory.mktemp("artifact") / "m.vaqkd.safetensors", tensors, header)
    return out, model



def _eval(path, cifar_root):
    return ["eval", str(path), "--data-root", str(cifar_root)]


def _tensor_offset(blob: bytes, name: str) -> int:
    """Where a tensor's bytes start in a safetensors file (8-byte length, JSON index, then the data)."""
    n = int.from_bytes(blob[:8], "little")
    return 8 + n + json.loads(blob[8 : 8 + n])[name]["data_offsets"][0]


def test_a_good_artifact_loads_and_its_model_is_the_packed_one(artifact):
    out, model = artifact
    packed, header = load(out)
    assert header["sha256"]["codes"] == tensor_sha256(load_file(out)["codes"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


@pytest.mark.parametrize("tensor,byte", [("codes", 0), ("codes", 5000), ("params", 1), ("params", 4003)])
def test_one_flipped_byte_in_a_tensor_names_the_tensor(tensor, byte, artifact, tmp_path, capsys, cifar_root):
    out, _ = artifact
    blob = bytearray(out.read_bytes())
    blob[_tensor_offset(blob, tensor) + byte] ^= 0x01
    bad = tmp_path / "bad.vaqkd.safetensors"
    bad.write_bytes(blob)
    with pytest.raises(RunFileError, match=rf"bad.vaqkd.safetensors: tensor '{tensor}' damaged"):
        load(bad)
    one_line(capsys, _eval(bad, cifar_root), f"tensor '{tensor}' damaged")


@pytest.mark.parametrize("old,new,needle", [
    (b"runs/x", b"runs/y", "header damaged (its sha256 does not match"),  # a byte inside the header text
    (b"resnet20", b"resnet32", "header damaged (its sha256 does not match"),
    (b'"__metadata__"', b'"__metadatb__"', "damaged or not a safetensors file"),  # the file's own index
    (b"vaqkd_sha256", b"vaqkd_sha257", "header damaged (its sha256 does not match"),
])  # fmt: skip
def test_one_flipped_byte_in_the_header(old, new, needle, artifact, tmp_path, capsys, cifar_root):
    out, _ = artifact
    blob = out.read_bytes()
    assert blob.count(old) == 1 and len(old) == len(new)
    bad = tmp_path / "bad.vaqkd.safetensors"
    bad.write_bytes(blob.replace(old, new))
    one_line(capsys, _eval(bad, cifar_root), "bad.vaqkd.safetensors: ", needle)


def _resealed(artifact, tmp_path, change_header=None, change_tensors=None, sealed_over=None) -> Path:
    """A copy whose header and tensors are changed and then sealed again: the hashes match, so the field and
    tensor checks are what must catch it."""
    out, _ = artifact
    tensors = load_file(out)
    from safetensors import safe_open

    header = json.loads(safe_open(str(out), "pt").metadata()[HEADER_KEY])
    del header["sha256"]
    if change_header:
        change_header(header)
    meta = seal(sealed_over or tensors, header)
    if change_tensors:
        change_tensors(tensors)
    bad = tmp_path / "bad.vaqkd.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return bad


def _set(path, value):
    def change(h):
        *keys, last = path.split(".")
        d = h
        for k in keys:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value

    return change


def _rename_quant(h):
    h["quantizer"] = h.pop("quant")


@pytest.mark.parametrize("change,needle", [
    (_rename_quant, "header field quant: missing"),
    (_set("quant.act", "relu6"), "header field quant: act: must be one of"),
    (_set("quant.w_bits", 0), "header field quant: w_bits: must be in [1, 8]"),
    (_set("quant.w_bits", 9), "header field quant: w_bits: must be in [1, 8]"),
    (_set("quant.w_bits", "2"), "header field quant: w_bits: expected int, got '2'"),
    (_set("quant.weight", "ewgs"), "header field quant: weight: 'ewgs' weights are never packed"),
    (_set("quant.first_last", KeyError), "header field quant: must be an object with keys"),
    (_set("mean", [0.5, 0.5, 0.5]), "header field mean: [0.5, 0.5, 0.5] is not cifar100's normalisation"),
    (_set("mean", [0.5, 0.5]), "header field mean: must be 3 numbers"),
    (_set("std", [0.2673, 0.0, 0.2762]), "header field std: must be 3 numbers in [0.001, 1]"),
    (_set("std", [0.2673, float("nan"), 0.2762]), "header field std: must be 3 numbers"),
    (_set("arch", "resnet9000"), "header field arch: unknown model 'resnet9000'"),
    (_set("num_classes", 0), "header field num_classes: must be an integer in [2, 1000000]"),
    (_set("num_classes", True), "header field num_classes: must be an integer"),
    (_set("dataset", "imagenet"), "header field dataset: must be cifar100, cifar10 or folder"),
    (_set("image_size", 0), "header field image_size: must be an integer in [8, 4096]"),
    (_set("layout_sha1", "zz"), "header field layout_sha1: must be 16 hex digits"),
    (_set("top1_last", 1e9), "header field top1_last: must be a percentage or null"),
    (_set("source_run", KeyError), "header field source_run: missing"),
    (_set("extra", 1), "header field extra: unknown field"),
    (_set("version", 1), "format version 1 carries no content hashes; re-export it"),
    (_set("version", 99), "format version 99 is not supported"),
    (_set("format", "other"), "format 'other', expected 'vaqkd-packed'"),
    (_set("num_classes", 10), "its layout does not match resnet20"),  # consistent fields, another model
])  # fmt: skip
def test_each_damaged_header_field_is_named(change, needle, artifact, tmp_path, capsys, cifar_root):
    bad = _resealed(artifact, tmp_path, change_header=change)
    with pytest.raises(RunFileError, match="bad.vaqkd.safetensors: "):
        load(bad)
    one_line(capsys, _eval(bad, cifar_root), needle)


def test_a_header_that_is_not_an_object(artifact, tmp_path, capsys, cifar_root):
    tensors = load_file(artifact[0])
    for text, needle in (("[1, 2]", "header damaged (a JSON list"), ("{", "header damaged (not JSON)")):
        bad = tmp_path / "bad.vaqkd.safetensors"
        save_file(tensors, str(bad), metadata={HEADER_KEY: text, HASH_KEY: sha256(text)})
        one_line(capsys, _eval(bad, cifar_root), needle)
    save_file(tensors, str(bad), metadata={"other": "x"})
    one_line(capsys, _eval(bad, cifar_root), "not a vaqkd packed artifact")


def test_unknown_missing_or_retyped_tensors_are_refused(artifact, tmp_path, capsys, cifar_root):
    good = load_file(artifact[0])
    cases = [
        (lambda t: t.update(extra=torch.zeros(3)), "unknown tensor(s) ['extra']"),
        (lambda t: t.pop("params"), "tensor(s) ['params'] missing"),
        (lambda t: t.update(codes=t["codes"].to(torch.int16)), "tensor 'codes' is torch.int16"),
    ]
    for change, needle in cases:
        bad = _resealed(artifact, tmp_path, change_tensors=change, sealed_over=good)
        one_line(capsys, _eval(bad, cifar_root), needle)
    # shorter tensors sealed as they are (hashes match): the header's sizes still catch them
    bad = _resealed(artifact, tmp_path, change_tensors=lambda t: t.update(codes=t["codes"][:-1]),
                    sealed_over={**good, "codes": good["codes"][:-1]})  # fmt: skip
    one_line(capsys, _eval(bad, cifar_root), "tensor sizes differ from the header's")


def test_the_committed_artifact_is_sealed_and_intact():
    path = ROOT / "results/deploy/qkd_feature-s0-deploy.vaqkd.safetensors"
    header, tensors = read_header(path)
    assert header["version"] == 2 and header["top1_last"] == 51.37
    assert tensors["codes"].numel() == 115_200 and tensors["params"].numel() == 11_536


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_onnx_file_is_one_line(damage, artifact, tmp_path, capsys, cifar_root):
    pytest.importorskip("onnxruntime")
    from vaqkd.deploy.onnx_export import build_onnx

    bad = tmp_path / "m.onnx"
    if damage == "truncated":
        proto = build_onnx(load(artifact[0])[0]).SerializeToString()
        bad.write_bytes(proto[: len(proto) // 3])
    elif damage == "garbage":
        bad.write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    else:
        bad.write_bytes(b"")
    one_line(capsys, [*_eval(bad, cifar_root), "--backend", "onnxruntime"], "m.onnx: damaged or not an ONNX model")
