"""Files from outside are data, never code: every loader of the project given a pickle whose payload would create
a directory (os.mkdir) or a file (open) on load refuses it, and the directory or file never appears."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from vaqkd.cli import main
from vaqkd.data.cifar import DataError, UnsafePickleError, class_names, load_split
from vaqkd.data.folder import load_folder_split
from vaqkd.errors import RunFileError
from vaqkd.rundir import load_checkpoint, save_checkpoint


class MakeDir:
    """Unpickling this calls os.mkdir(path)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


class MakeFile:
    """Unpickling this calls open(path, "w"), creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


PAYLOADS = [MakeDir, MakeFile]


def _poison_cifar(path, payload, marker):
    """The official layout with one extra entry whose unpickling runs the payload (still a valid dict after)."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d["batch_label"] = payload(marker)
    path.write_bytes(pickle.dumps(d, protocol=2))


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_split_with_a_payload_is_refused_and_nothing_runs(split, payload, cifar_root, tmp_path):
    marker = tmp_path / "owned"
    path = cifar_root / "cifar-100-python" / split
    _poison_cifar(path, payload, marker)
    with pytest.raises(UnsafePickleError, match=rf"{split}: refused, not a plain data pickle \(refers to "):
        load_split("cifar100", cifar_root, train=split == "train", download_missing=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_cifar_meta_with_a_payload_is_refused_and_nothing_runs(payload, cifar_root, tmp_path):
    marker = tmp_path / "owned"
    _poison_cifar(cifar_root / "cifar-100-python" / "meta", payload, marker)
    with pytest.raises(UnsafePickleError, match="meta: refused"):
        class_names("cifar100", cifar_root)
    assert not marker.exists()


def test_cli_train_on_a_poisoned_dataset_is_one_line_and_runs_nothing(capsys, cifar_root, tmp_path):
    marker = tmp_path / "owned"
    _poison_cifar(cifar_root / "cifar-100-python" / "train", MakeDir, marker)
    args = ["train", "configs/cifar100/w2a2_qat.toml", "--out", str(tmp_path / "r"), "--data-root", str(cifar_root),
            "--set", 'model.init=""', "--set", "optim.epochs=1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refers to posix.mkdir" in err and "train: refused" in err, err
    assert not marker.exists() and not list((tmp_path / "r").glob("ckpt-*"))


@pytest.mark.parametrize(
    "obj",
    [np.array([1, "x"], dtype=object), np.zeros(3, dtype=[("a", "u1"), ("b", "f4")]), np.zeros(3, dtype="M8[s]")],
    ids=["object", "structured", "datetime"],
)
def test_cifar_arrays_of_other_dtypes_are_refused(obj, cifar_root):
    path = cifar_root / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps({"data": obj, "fine_labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="test: "):
        load_split("cifar100", cifar_root, train=False, download_missing=False)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_copies_pickled_with_any_protocol_still_load(protocol, cifar_root):
    path = cifar_root / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d["filenames"] = [b"a.png"] * len(d["fine_labels"])  # bytes, as Python 3 re-pickles the official str
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    x, y = load_split("cifar100", cifar_root, train=False, download_missing=False)
    assert x.shape == (200, 3, 32, 32) and y.tolist() == d["fine_labels"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_folder_cache_with_a_payload_is_decoded_again_and_nothing_runs(payload, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "train" / c / "0.png")
    x, y, _ = load_folder_split(root, train=True, size=8)
    (cache,) = root.glob(".vaqkd_cache_train_*.pt")
    marker = tmp_path / "owned"
    torch.save({"images": x, "labels": y, "x": payload(marker)}, cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x2, y2, _ = load_folder_split(root, train=True, size=8)
    assert not marker.exists()
    assert any("damaged decoded-image cache" in str(w.message) for w in caught)
    assert torch.equal(x2, x) and torch.equal(y2, y)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_checkpoint_state_with_a_payload_is_refused_and_nothing_runs(payload, tmp_path):
    model, objective = nn.Linear(2, 2), nn.Linear(2, 1)
    (tmp_path / "run").mkdir()
    ck = save_checkpoint(tmp_path / "run", model, objective, {"step": 3})
    marker = tmp_path / "owned"
    torch.save({"step": 3, "x": payload(marker)}, ck / "state.pt")
    with pytest.raises(RunFileError, match="state.pt: damaged or not a checkpoint state"):
        load_checkpoint(tmp_path / "run", model, objective, torch.device("cpu"))
    assert not marker.exists()


def test_gradcam_does_not_paper_over_a_poisoned_meta_file(cifar_root, tmp_path, monkeypatch):
    """gradcam falls back to class indices when names are missing; a meta file that would run code is an error."""
    import vaqkd.analysis.gradcam as gradcam
    from vaqkd.config import load_config
    from vaqkd.data.build import build_data
    from vaqkd.models import create_model

    marker = tmp_path / "owned"
    _poison_cifar(cifar_root / "cifar-100-python" / "meta", MakeDir, marker)
    cfg = load_config(None, [f'data.root="{cifar_root}"', "data.batch_size=100"])
    run = (create_model("resnet20", 100).eval(), build_data(cfg, torch.device("cpu")), cfg)
    monkeypatch.setattr(gradcam, "load_run_model", lambda *a, **k: run)
    with pytest.raises(UnsafePickleError, match="meta: refused"):
        gradcam.gradcam_figure("a", "b", images=2, out=str(tmp_path / "g.png"))
    assert not marker.exists() and not (tmp_path / "g.png").exists()
