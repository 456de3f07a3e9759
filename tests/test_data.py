import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vaqkd.data.cifar import DataError, class_names, load_split
from vaqkd.data.loader import DeviceLoader, subset_per_class


def test_cifar_pickle_layout_gives_right_images_and_labels(cifar_root):
    x, y = load_split("cifar100", cifar_root, train=True, download_missing=False)
    assert x.shape == (400, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.shape == (400,)
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert y.tolist() == raw["fine_labels"]  # fine labels, not coarse, in file order
    # row layout: 1024 R, then G, then B, each row-major 32x32
    assert x[7, 1, 3, 5].item() == raw["data"][7, 1024 + 3 * 32 + 5]
    assert class_names("cifar100", cifar_root)[3] == "class3"


def test_missing_offline_names_the_folder(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        load_split("cifar100", tmp_path, train=True, download_missing=False)


def test_bad_files_are_named(cifar_root):
    path = cifar_root / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d["fine_labels"][0] = 100
    with open(path, "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(DataError, match=r"test: labels outside"):
        load_split("cifar100", cifar_root, train=False, download_missing=False)
    d["fine_labels"][0] = 1
    d["data"] = d["data"][:, :100]
    with open(path, "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(DataError, match=r"test: 'data' must be a uint8 array"):
        load_split("cifar100", cifar_root, train=False, download_missing=False)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR pickle"):
        load_split("cifar100", cifar_root, train=False, download_missing=False)


def test_unbalanced_split_rejected(cifar_root):
    path = cifar_root / "cifar-100-python" / "train"
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d["fine_labels"] = [0] + d["fine_labels"][1:]
    d["fine_labels"][d["fine_labels"].index(0, 1)] = 5 if d["fine_labels"][0] == 0 else 0
    with open(path, "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(DataError, match="unbalanced"):
        load_split("cifar100", cifar_root, train=True, download_missing=False)


def test_subset_first_n_per_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 1, 0])
    idx = subset_per_class(labels, 2)
    assert idx.tolist() == [0, 1, 2, 3, 4, 6]
    assert subset_per_class(labels, 0).tolist() == list(range(8))


def _loader(x, y, seed=0, train=True):
    return DeviceLoader(x, y, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), train=train, seed=seed)


def test_loader_deterministic_resumable_and_label_aligned():
    n = 50
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n) % 10
    a = list(_loader(x, y).batches(3))
    b = list(_loader(x, y).batches(3, start=1))
    assert len(a) == 3  # drop_last on train
    for (xa, ya, ia), (xb, yb, ib) in zip(a[1:], b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    other = list(_loader(x, y).batches(4))
    assert not torch.equal(a[0][2], other[0][2])  # a new order each epoch
    for xb, yb, ib in a:
        assert torch.equal(yb, y[ib])  # labels follow the images
        # each image is constant = its index; after crop (zero padding) every pixel is that value or the pad
        centre = xb[:, 0, 12:20, 12:20] * 0.25 + 0.5
        assert torch.allclose(centre * 255, ib.float().view(-1, 1, 1).expand_as(centre), atol=1e-3)


def test_loader_augments_train_not_test():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.zeros(32, dtype=torch.long)
    xt, _, it = next(iter(_loader(x, y, train=False)))
    ref = (x[:16].float() - 127.5) / 63.75
    assert torch.allclose(xt, ref) and it.tolist() == list(range(16))
    xa, _, ia = next(iter(_loader(x, y, train=True)))
    ref = (x[ia].float() - 127.5) / 63.75
    assert not torch.allclose(xa, ref)  # crops and flips happened
    assert xa.shape == ref.shape


def test_folder_dataset_decodes_once_and_caches(tmp_path):
    from PIL import Image

    from vaqkd.data.folder import load_folder_split

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    x, y, classes = load_folder_split(tmp_path, True, 32)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["cat", "dog"]
    caches = list(tmp_path.glob(".vaqkd_cache_train_*.pt"))
    assert len(caches) == 1
    x2, y2, _ = load_folder_split(tmp_path, True, 32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    (tmp_path / "test" / "dog" / "0.png").write_bytes(b"broken")
    with pytest.raises(Exception, match="0.png: cannot decode"):
        load_folder_split(tmp_path, False, 32)


def test_real_cifar100_structure(real_cifar100):
    x, y = load_split("cifar100", real_cifar100, train=False, download_missing=False)
    assert x.shape == (10000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [100] * 100
    assert y[:10].tolist() == [49, 33, 72, 51, 71, 92, 15, 14, 23, 0]


def test_float_labels_are_refused_not_truncated(cifar_root):
    path = cifar_root / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d["fine_labels"] = [label + 0.7 for label in d["fine_labels"]]  # int() would make these the right labels
    path.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataError, match=r"test: 'fine_labels' holds float64 values, expected integer labels"):
        load_split("cifar100", cifar_root, train=False, download_missing=False)


def test_empty_split_says_so(cifar_root):
    path = cifar_root / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "fine_labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"test: holds no images \(the official split has 100 classes\)$"):
        load_split("cifar100", cifar_root, train=False, download_missing=False)


def test_download_has_a_timeout(monkeypatch, tmp_path):
    import urllib.request

    from vaqkd.data import cifar

    seen = {}

    def stalled(url, timeout=None):
        seen["timeout"] = timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", stalled)
    with pytest.raises(DataError, match="the download failed"):
        cifar.download("cifar100", tmp_path)
    assert seen["timeout"] == cifar.DOWNLOAD_TIMEOUT_S and not list(tmp_path.iterdir())
    # a mistyped data root: the folders the download would have made are not left behind; a folder that was
    # there before, or that holds something, stays
    with pytest.raises(DataError, match="the download failed"):
        cifar.download("cifar100", tmp_path / "typo" / "deeper")
    assert not list(tmp_path.iterdir())
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError, match="the download failed"):
        cifar.download("cifar100", tmp_path / "kept" / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())


def test_cifar_part_keeps_the_first_images_of_every_class(shared_cifar_root, tmp_path):
    """scripts/cifar_part.py: a class-balanced part in the official layout, the first k of each class in order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cifar_part", Path(__file__).parents[1] / "scripts" / "cifar_part.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.part(str(shared_cifar_root), 2, 1, tmp_path) == {"train": 200, "test": 100}
    for train, k in ((True, 2), (False, 1)):
        x, y = load_split("cifar100", tmp_path, train, download_missing=False)
        fx, fy = load_split("cifar100", shared_cifar_root, train, download_missing=False)
        keep = torch.cat([torch.nonzero(fy == c).flatten()[:k] for c in range(100)]).sort().values
        assert torch.equal(x, fx[keep]) and torch.equal(y, fy[keep])
    # never over the dataset it is cut from; an existing part only with force; a count the data cannot give is
    # refused before anything is written
    source = (shared_cifar_root / "cifar-100-python" / "train").read_bytes()
    with pytest.raises(DataError, match="is the data root itself"):
        mod.part(str(shared_cifar_root), 1, 1, shared_cifar_root, force=True)
    assert (shared_cifar_root / "cifar-100-python" / "train").read_bytes() == source
    with pytest.raises(DataError, match="exists; remove it, choose another --out, or pass --force"):
        mod.part(str(shared_cifar_root), 1, 1, tmp_path)
    with pytest.raises(DataError, match="--test-per-class 5: .* fewer than 5 images in some class"):
        mod.part(str(shared_cifar_root), 1, 5, tmp_path / "new")
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").rglob("*"))
    assert mod.part(str(shared_cifar_root), 1, 1, tmp_path, force=True) == {"train": 100, "test": 100}
