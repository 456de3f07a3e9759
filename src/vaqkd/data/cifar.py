"""CIFAR-10 / CIFAR-100 from the official "python version" pickles.

Two ways in:
  * a folder the user already has: checked for *structure* (keys, dtype, shapes, label ranges, per-class
    counts), not bytes, since faithful re-creations of CIFAR exist that are not byte-identical;
  * a download (when the files are missing and the machine is online): the archive is checked against the
    published MD5 before it is unpacked.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaqkd.errors import VaqkdError, file_in_the_way, user_path

DOWNLOAD_TIMEOUT_S = 60  # seconds without a byte from the server before the download counts as failed


class DataError(VaqkdError, RuntimeError):
    """Missing or malformed dataset files (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class CifarSpec:
    folder: str  # folder inside the archive
    url: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    train_per_class: int
    test_per_class: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SPECS = {
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        train_per_class=500,
        test_per_class=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        train_per_class=5000,
        test_per_class=1000,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
}


def get_spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(SPECS)}")
    return SPECS[name]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, root: Path) -> None:
    """Download the official archive into `root`, verify its published MD5, and unpack it."""
    spec = get_spec(name)
    if (blocker := file_in_the_way(root)) is not None:
        raise DataError(f"{root}: {blocker} is a file, not a folder; the data root must be a folder")
    archive = root / Path(spec.url).name
    if not archive.exists():
        tmp = archive.with_suffix(".part")
        made = [p for p in (root, *root.parents) if not p.exists()]  # folders a failed download takes away again
        try:
            # a timeout on every read: a stalled server is an error, not a hang
            with urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as r:  # noqa: S310
                root.mkdir(parents=True, exist_ok=True)  # only once the server answers
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
        except (urllib.error.URLError, OSError) as e:  # socket timeouts are OSErrors
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            for folder in made:  # innermost first; never one that holds anything
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise DataError(
                f"{name} not found under {root / spec.folder} and the download failed ({e}); "
                f"put the official '{spec.folder}' folder there or set --data-root / VAQKD_DATA"
            ) from None
        tmp.rename(archive)
    digest = _md5(archive)
    if digest != spec.archive_md5:
        raise DataError(f"{archive}: MD5 {digest} does not match the published {spec.archive_md5}; delete it and retry")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")


class UnsafePickleError(DataError):
    """A dataset pickle that names a callable the official files do not hold: refused before anything runs."""


def _plain_dtype(spec, align=False, copy=False):
    """numpy.dtype as the official files pickle it (`dtype('u1', False, True)`), for plain numeric kinds only."""
    dt = np.dtype(spec) if isinstance(spec, str) else None
    if dt is None or dt.kind not in "biuf" or isinstance(align, str) or isinstance(copy, str):
        raise pickle.UnpicklingError(f"dtype {spec!r} is not a plain numeric dtype")
    return np.dtype(spec, bool(align), bool(copy))


_RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not numpy.ndarray")
    return _RECONSTRUCT(subtype, shape, dtype)


def _latin1(text, encoding="latin1"):
    """_codecs.encode as Python 3 pickles bytes at protocol 2 (latin-1 text -> bytes), nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not how bytes are pickled")
    return text.encode("latin1")


def _empty_bytes(*args):
    """bytes() as Python 3 pickles b"" at protocol 2 (the raw data of an empty array), nothing else."""
    if args:
        raise pickle.UnpicklingError("bytes(...) with arguments is not how bytes are pickled")
    return b""


# Everything the official files (and numpy's own re-pickling of them, protocols 2-4) name: numpy arrays of
# plain dtypes. dicts, lists, str, bytes and ints need no global at all.
_ALLOWED = {
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1,
    **{(m, "bytes"): _empty_bytes for m in ("__builtin__", "builtins")},
}


def _frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array constructor, for plain dtypes (a re-pickled copy of the official files)."""
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
        raise pickle.UnpicklingError("array from a buffer of a non-plain dtype")
    return np.frombuffer(buf, dtype).reshape(shape, order="F" if order == "F" else "C").copy()


_ALLOWED.update({(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")})


class _DataUnpickler(pickle._Unpickler):
    """An unpickler that builds data only: any global outside `_ALLOWED` (os.system, eval, a class) is refused
    before it is called, and BUILD (setting an object's state) is admitted only for a plain dtype's byte order
    and a plain array's (shape, dtype, raw bytes), so a hostile file can neither run code nor hand numpy a
    forged object array. (The pure-Python unpickler, since the C one does not expose BUILD.)"""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"refers to {module}.{name}")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise UnsafePickleError("holds a persistent reference")

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                  and state[2:] == (None, None, None, -1, -1, 0))  # fmt: skip
        else:
            ok = (type(inst) is np.ndarray and isinstance(state, tuple) and len(state) == 5
                  and isinstance(state[2], np.dtype) and state[2].kind in "biuf" and state[2].names is None
                  and isinstance(state[4], (bytes, str)))  # fmt: skip
        if not ok:
            raise UnsafePickleError(f"sets the state of a {type(inst).__name__} in a way numpy's plain arrays do not")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _load_pickle(path: Path) -> dict:
    """A CIFAR pickle, loaded as data: only dicts, lists, str/bytes, numbers and plain numpy arrays come out."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: refused, not a plain data pickle ({e}); datasets are data, never code"
        ) from None
    except EOFError:  # a download or a copy cut short
        raise DataError(f"{path}: truncated (the pickle ends early); replace it with the official file") from None
    except Exception as e:  # unpickling errors come in many types
        raise DataError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {str(e)[:160]})") from None


def _check_split(path: Path, d: dict, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR pickle (holds a {type(d).__name__}, expected a dict)")
    for key in ("data", spec.label_key):
        if key not in d:
            raise DataError(f"{path}: key {key!r} missing (found {sorted(d)})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {dtype} {shape}")
    try:
        raw = np.asarray(d[spec.label_key])
        labels = raw.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: {spec.label_key!r} is not a list of integer labels") from None
    if raw.size and raw.dtype.kind not in "iu":  # floats (3.7) would be truncated, bools read as 0/1
        raise DataError(f"{path}: {spec.label_key!r} holds {raw.dtype} values, expected integer labels")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{path}: labels outside [0, {spec.num_classes}) (min {labels.min()}, max {labels.max()})")
    return data, labels


def split_present(name: str, root: str | Path, train: bool) -> bool:
    """Whether a split's files are under `root` (nothing read, nothing downloaded)."""
    spec = get_spec(name)
    folder = user_path(root) / spec.folder
    return all((folder / f).exists() for f in (spec.train_files if train else spec.test_files))


def load_split(
    name: str, root: str | Path, train: bool, download_missing: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (images uint8 (N, 3, 32, 32), labels int64 (N,)) after structural checks.

    `root` is the folder that holds e.g. `cifar-100-python/`. Missing files are downloaded when
    `download_missing` and the machine is online; otherwise a one-line error says where to put them.
    """
    spec = get_spec(name)
    root = user_path(root)
    folder = root / spec.folder
    files = spec.train_files if train else spec.test_files
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file, not the dataset's folder; put the official '{spec.folder}' folder there")
    if not split_present(name, root, train):
        if not download_missing:
            raise DataError(f"{name}: {folder} is missing {list(files)}; put the official '{spec.folder}' folder there")
        download(name, root)
    parts = [_check_split(folder / f, _load_pickle(folder / f), spec) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # Per-class counts: the official splits are balanced (500/100 per class for CIFAR-100); a folder that is
    # not balanced is a truncated or mixed-up copy.
    counts = np.bincount(labels, minlength=spec.num_classes)
    if data.shape[0] == 0:
        raise DataError(f"{folder / files[0]}: holds no images (the official split has {spec.num_classes} classes)")
    if not (counts == counts[0]).all():
        bad = int(np.argmax(counts != counts[0]))
        raise DataError(
            f"{folder / files[0]}: unbalanced classes (class 0 has {counts[0]} images, class {bad} has "
            f"{counts[bad]}; the official split has {spec.train_per_class if train else spec.test_per_class})"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def class_names(name: str, root: str | Path) -> list[str]:
    spec = get_spec(name)
    path = user_path(root) / spec.folder / ("meta" if name == "cifar100" else "batches.meta")
    meta = _load_pickle(path)
    key = "fine_label_names" if name == "cifar100" else "label_names"
    if key not in meta or len(meta[key]) != spec.num_classes:
        raise DataError(f"{path}: expected {spec.num_classes} names under {key!r}")
    return list(meta[key])
