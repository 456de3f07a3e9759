"""Bad input: one test each, a one-line error naming the culprit and no traceback (the CLI's exit code 2);
fuzzing of the config loader and the CIFAR reader (hypothesis)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import one_line_error
from vaqkd.config import Config, from_dict, load_config
from vaqkd.data.cifar import DataError, load_split
from vaqkd.errors import ConfigError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])



@pytest.mark.parametrize(
    "sets,needle",
    [
        (["quant.w_bits=0"], "quant.w_bits: must be in [1, 8]"),
        (["quant.w_bits=33"], "quant.w_bits: must be in [1, 8]"),
        (["quant.a_bits=1"], "quant.a_bits: lsq needs at least 2 bits"),
        (["quant.weight=ewgs", "quant.per_channel=true"], "quant.per_channel: per-channel steps exist for lsq only"),
        (["optim.lr=-0.1"], "optim.lr: must be > 0"),
        (["optim.epochs=0"], "optim.epochs: must be in [1, 2^31 - 1], got 0"),
        (["data.subset_per_class=99999999999999999999"], "data.subset_per_class: must be in [0, 2^31 - 1]"),
        (["train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps: must be in [0, 2^31 - 1], got -1"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["train.seed=1.5"], "train.seed: expected an integer"),
        (["distill.terms.1.anchor_bits=[]"], "distill.terms.1.anchor_weights: needs one weight per anchor"),
        (["distill.terms.1.anchor_bits=[0]"], "distill.terms.1.anchor_bits: bit widths must be in [1, 16]"),
        (["distill.terms.1.anchor_bits=[33]"], "distill.terms.1.anchor_bits: bit widths must be in [1, 16]"),
        (["optim.nonsense=1"], "optim.nonsense: unknown key"),
    ],
)
def test_bad_config_values(sets, needle, capsys, tmp_path):
    args = ["train", "configs/cifar100/vaqkd_logit.toml", "--out", str(tmp_path / "r")]
    one_line_error(capsys, args + [a for s in sets for a in ("--set", s)], needle)
    assert not (tmp_path / "r").exists()  # stopped before any work


def test_malformed_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 0.1\n")
    one_line_error(capsys, ["train", str(bad)], "bad.toml: invalid TOML")


def test_a_path_that_does_not_exist_is_named_so_not_called_a_folder_without_a_config(capsys, tmp_path):
    gone = str(tmp_path / "gone.vaqkd.safetensors")
    one_line_error(capsys, ["eval", gone], f"{gone}: no such run directory (or file)")
    one_line_error(capsys, ["gradcam", gone, gone], f"{gone}: no such run directory (or file)")
    one_line_error(capsys, ["eval", str(tmp_path)], f"{tmp_path}: not a run directory (no config.toml)")


def test_batch_larger_than_the_data(capsys, cifar_root, tmp_path):
    args = ["train", "configs/cifar100/w2a2_qat.toml", "--out", str(tmp_path / "r"), "--data-root", str(cifar_root),
            "--set", "data.batch_size=1000", "--set", 'model.init=""']  # fmt: skip
    one_line_error(capsys, args, "data.batch_size: 1000 is larger than the 400 training images")
    assert not list((tmp_path / "r").glob("ckpt-*"))


def test_batch_that_does_not_split_into_micro_batches(capsys, cifar_root, tmp_path):
    args = ["train", "configs/cifar100/w2a2_qat.toml", "--out", str(tmp_path / "r"), "--data-root", str(cifar_root),
            "--set", "data.batch_size=64", "--set", "train.micro_batches=3", "--set", 'model.init=""']  # fmt: skip
    one_line_error(capsys, args, "data.batch_size: 64 does not divide into 1 processes x 3 micro-batches")


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "wrong_shape"])
def test_damaged_dataset_files(damage, capsys, cifar_root, tmp_path):
    path = cifar_root / "cifar-100-python" / "train"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        d = pickle.loads(path.read_bytes(), encoding="latin1")
        d["data"] = d["data"][:, :1000]
        path.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="cifar-100-python"):
        load_split("cifar100", cifar_root, train=True, download_missing=False)


# ---------------------------------------------------------------------------------------------------------
# fuzzing

KEYS = {
    "data": ["dataset", "root", "subset_per_class", "batch_size", "image_size", "bogus"],
    "quant": ["enabled", "w_bits", "a_bits", "weight", "act", "per_channel", "first_last", "calib_batches"],
    "optim": ["epochs", "lr", "momentum", "schedule", "milestones", "gamma", "warmup_epochs", "nesterov"],
    "train": ["seed", "device", "precision", "threads", "eval_every"],
    "distill": ["teacher", "terms"],
}
values = st.one_of(
    st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=8),
    st.lists(st.integers(-3, 40), max_size=3), st.sampled_from(["lsq", "pact", "ewgs", "dorefa", "cosine", "8", "cpu"]),
    st.lists(st.dictionaries(st.sampled_from(["kind", "weight", "anchor_bits", "anchor_weights", "stage", "x"]),
                             st.one_of(st.sampled_from(["kd", "ce", "crd", "hint", "layer2"]), st.floats(-1, 2),
                                       st.lists(st.integers(0, 20), max_size=2))), max_size=3),
)  # fmt: skip
configs = st.dictionaries(
    st.sampled_from([*KEYS, "name", "extra"]),
    st.one_of(values, st.dictionaries(st.sampled_from(sum(KEYS.values(), [])), values, max_size=4)),
    max_size=5,
)


@FUZZ
@given(d=configs)
def test_fuzz_config_dict_gives_a_config_or_a_config_error(d):
    try:
        cfg = from_dict(Config, d).validate()
    except ConfigError:
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("[]=.\"'{},\n #abdeilmnoprstuqz0123456789_-")), max_size=80))
def test_fuzz_config_text_gives_a_config_or_a_config_error(text, tmp_path):
    p = tmp_path / "fuzz.toml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError:
        pass


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


arrays = st.builds(
    lambda n, w, dt: np.zeros((n, w), dtype=dt), st.integers(0, 4), st.sampled_from([3072, 3071, 1]),
    st.sampled_from([np.uint8, np.float32, np.int64]),
)  # fmt: skip
payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(_pickled, st.dictionaries(st.sampled_from(["data", "fine_labels", "labels", "x"]),
                                        st.one_of(arrays, st.lists(st.integers(-2, 120), max_size=5), st.none()))),
    st.builds(_pickled, st.one_of(st.lists(st.integers()), st.text(), st.integers())),
)  # fmt: skip


@FUZZ
@given(payload=payloads)
def test_fuzz_cifar_reader_gives_data_or_a_data_error(payload, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir(exist_ok=True)
    (folder / "test").write_bytes(payload)
    try:
        x, y = load_split("cifar100", tmp_path, train=False, download_missing=False)
    except DataError:
        return
    assert x.dtype.is_floating_point is False and len(x) == len(y) > 0


def test_more_bad_input_is_one_line_before_any_work(capsys, tmp_path):
    import torch

    from vaqkd.models import create_model
    from vaqkd.rundir import load_weights

    one_line_error(capsys, ["gradcam", "a", "b", "--out", str(tmp_path / "g.txt")],
                   ".txt is not an image format matplotlib writes")  # fmt: skip
    one_line_error(capsys, ["gradcam", "a", "b", "--out", str(tmp_path / "no" / "g.png")], "is not a folder")
    (tmp_path / "kept.png").write_bytes(b"figure")
    one_line_error(capsys, ["gradcam", "a", "b", "--out", str(tmp_path / "kept.png")],
                   "kept.png: exists; remove it, choose another --out, or pass --force")  # fmt: skip
    assert (tmp_path / "kept.png").read_bytes() == b"figure"
    (tmp_path / "kept.png").unlink()
    x = str(tmp_path / "x")
    one_line_error(capsys, ["export", "pretrained", "--out", x], "pretrained: FP32 weights; --format packed takes")
    one_line_error(capsys, ["export", "pretrained", "--format", "onnx", "--out", x + ".vaqkd.safetensors"],
                   "a .safetensors name for --format onnx")  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    one_line_error(capsys, ["export", str(run), "--out", x + ".onnx"], "a .onnx name for --format packed")
    one_line_error(capsys, ["export", str(run), "--format", "onnx", "--dataset", "cifar10", "--out", x + ".onnx"],
                   "--arch / --dataset: for FP32 weights only")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    one_line_error(capsys, ["eval", x + ".onnx", "--precision", "bf16"], "--precision bf16: the torch backend's")
    one_line_error(capsys, ["eval", str(run), "--backend", "onnxruntime", "--precision", "bf16"], "torch backend's")
    one_line_error(capsys, ["eval", str(run), "--device", ""], "--device")  # was taken as "auto"
    for key in ("quant.w_bits=4", "model.arch=resnet20", "distill.terms.0.weight=1"):  # evaluated silently before
        name = key.split("=")[0]
        one_line_error(capsys, ["eval", str(tmp_path), "--set", key], f"--set {name}: would change the model")
    args = ["train", "configs/cifar100/w2a2_qat.toml", "--out", str(tmp_path / "r"),
            "--set", "train.threads=99999999999"]  # fmt: skip
    one_line_error(capsys, args, "train.threads: must be in [0, 4096]")
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        from vaqkd.cli import main

        main(["bench", "--batch", "50001"])
    assert "argument --batch: must be in [1, 50000], got 50001" in capsys.readouterr().err
    from vaqkd.errors import RunFileError

    with pytest.raises(RunFileError, match=r"resnet32_cifar100.safetensors: does not fit resnet32 here \(size mis"):
        load_weights(create_model("resnet32", 10).to(torch.device("cpu")), "pretrained", "resnet32")  # 100 classes


def test_config_text_edges(capsys, tmp_path, monkeypatch):
    from vaqkd.data.build import data_root

    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbfname = 'bom'\n")  # an editor's byte-order mark: read, not "invalid TOML"
    assert load_config(bom).name == "bom"
    listed = tmp_path / "listed.toml"
    listed.write_text('[[data]]\ndataset = "cifar100"\n')
    with pytest.raises(ConfigError, match=r"listed.toml: \[data\] must be a table, got a list"):
        load_config(listed, [("data.root", "x")])  # was "data.root: no list item 'root'", a key the user never wrote
    with pytest.raises(ConfigError, match="optim.milestones: must be epochs > 0"):
        load_config(None, ["optim.milestones=[-5]"])
    with pytest.raises(ConfigError, match="name: must be a plain folder name"):
        load_config(None, ['name="a\\nb"'])
    monkeypatch.setenv("VAQKD_DATA", "")  # set but empty: the default ./data, as the help says (was the cwd)
    assert str(data_root(load_config(None).data)) == "data"


def test_paths_that_cannot_be_paths_are_one_line_naming_them(capsys, tmp_path, monkeypatch):
    """An unknown ~user, a symlink loop (as a config, an --out file, an --out folder) and a source that does not
    exist: each a line naming the path, no traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loopa").symlink_to("loopb")
    (tmp_path / "loopb").symlink_to("loopa")
    root = Path(__file__).resolve().parents[1]
    art = str(root / "results/deploy/qkd_logit-int8stream-full-s1.vaqkd.safetensors")
    one_line_error(capsys, ["eval", art, "--data-root", "~no_such_user_here/x"],
                   "~no_such_user_here/x: ~no_such_user_here is no user's home directory")  # fmt: skip
    one_line_error(capsys, ["train", "loopa"], "loopa: cannot be resolved")
    one_line_error(capsys, ["export", art, "--format", "onnx", "--out", "loopa"], "loopa: cannot be resolved")
    one_line_error(capsys, ["train", str(root / "configs/cifar100/w2a2_qat.toml"), "--out", "loopa"],
                   "loopa: a symlink that leads to no folder")  # fmt: skip
    one_line_error(capsys, ["export", "nope", "--out", "x.vaqkd.safetensors"], "nope: no such run directory (or file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loopa", "loopb"]


def test_messages_name_the_culprit_not_a_neighbour(capsys, cifar_root, tmp_path):
    """Each error says what is wrong with the thing the user gave: a truncated split, a dataset folder that is a
    file, a directory given as an ONNX file, a bad value in a config file (the file named), weights named by the
    setting that names them, an unknown --arch or --preset, and a table whose --out or --teacher cannot be used
    (said before the teacher is evaluated)."""
    from vaqkd.data.cifar import load_split
    from vaqkd.presets import load_preset

    test = cifar_root / "cifar-100-python" / "test"
    whole = test.read_bytes()
    test.write_bytes(whole[:1000])
    with pytest.raises(DataError, match=r"test: truncated \(the pickle ends early\)"):
        load_split("cifar100", cifar_root, train=False, download_missing=False)
    test.write_bytes(whole)
    as_file = tmp_path / "as_file"
    as_file.mkdir()
    (as_file / "cifar-100-python").write_text("not a folder")
    with pytest.raises(DataError, match=r"cifar-100-python: is a file, not the dataset's folder"):
        load_split("cifar100", as_file, train=False)
    (tmp_path / "d.onnx").mkdir()
    one_line_error(capsys, ["eval", str(tmp_path / "d.onnx")], "d.onnx: is a directory, not an ONNX file")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nepochs = \"x\"\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: optim\.epochs: expected an integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^optim\.epochs: must be in"):  # an override's own error: no file
        load_config(bad, ["optim.epochs=0"])
    one_line_error(capsys, ["train", str(bad), "--out", str(tmp_path / "r")],
                   "bad.toml: optim.epochs: expected an integer")  # fmt: skip
    bad.write_text("[quant]\nresidual_bits = 3\n")  # an override of a key that is a prefix of the culprit's
    with pytest.raises(ConfigError, match=r"bad\.toml: quant\.residual_bits: must be 0"):
        load_config(bad, ['quant.residual="int"'])
    gone = str(tmp_path / "gone")
    one_line_error(capsys, ["train", "configs/cifar100/vaqkd_logit.toml", "--out", str(tmp_path / "r"),
                            "--data-root", str(cifar_root), "--set", f'distill.teacher="{gone}"'],
                   f"distill.teacher {gone}: weights not found")  # fmt: skip
    one_line_error(capsys, ["export", "pretrained", "--arch", "nope", "--format", "onnx", "--out",
                            str(tmp_path / "t.onnx")], "--arch nope: unknown model; registered: [")  # fmt: skip
    with pytest.raises(ConfigError, match=r"--preset \.\./cifar100/takd: unknown preset; available: demo"):
        load_preset("../cifar100/takd")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile is a file, not a folder; the data root must be a folder"):
        load_split("cifar100", tmp_path / "afile", train=False)  # it hid behind the download's clean-up
    one_line_error(capsys, ["table", "--out", str(tmp_path / "afile" / "t"), "--runs-dir", str(tmp_path / "runs"),
                            "--data-root", str(cifar_root)], "--out", "afile is a file, not a folder")  # fmt: skip
    one_line_error(capsys, ["table", "--report-only", "--teacher", gone, "--out", str(tmp_path / "o"),
                            "--runs-dir", str(tmp_path / "runs")], f"teacher {gone}: weights not found")  # fmt: skip
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()
