"""Write a class-balanced part of CIFAR-100 in the official pickle layout: the first N training and M test images
of every class, in the official order, so that `--data-root` can point at it like at the whole dataset (for a
machine the whole 150 MB training split cannot reach; results/gpu/h200 was trained on the part below).

    python scripts/cifar_part.py --data-root ../shared/data/cifar100 --train-per-class 100 --test-per-class 20 \
        --out /tmp/part    # -> /tmp/part/cifar-100-python/{train,test,meta}

The source is read through the project's own loader (structure checks, no code run from the pickles); the part is
written as plain dicts of lists and a uint8 array (pickle protocol 2, as the official files), which that loader
reads back.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path

import numpy as np

from vaqkd.cli import int_in, output_folder
from vaqkd.data.build import env_data_root
from vaqkd.data.cifar import DataError, get_spec, load_split
from vaqkd.errors import resolved, user_path


def part(data_root: str, train_per_class: int, test_per_class: int, out: Path, force: bool = False) -> dict:
    spec = get_spec("cifar100")
    source, folder = user_path(data_root) / spec.folder, user_path(out) / spec.folder
    if resolved(folder) == resolved(source):
        raise DataError(f"--out {out}: is the data root itself; the part would overwrite the dataset it is cut from")
    if folder.exists() and any(folder.iterdir()) and not force:
        raise DataError(f"--out {out}: {folder} exists; remove it, choose another --out, or pass --force")
    parts, counts = {}, {}
    for split, k in (("train", train_per_class), ("test", test_per_class)):  # every check before anything is written
        images, labels = load_split("cifar100", data_root, split == "train", download_missing=False)
        labels = labels.numpy()
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(spec.num_classes)]))
        if len(keep) != k * spec.num_classes:
            raise DataError(f"--{split}-per-class {k}: {source / split} has fewer than {k} images in some class")
        parts[split] = {"batch_label": f"{split}, {k} per class", "fine_labels": labels[keep].tolist(),
                        "data": images.numpy()[keep].reshape(len(keep), -1)}  # fmt: skip
        counts[split] = len(keep)
    if not (source / "meta").is_file():
        raise DataError(f"{source / 'meta'}: missing (the class names the part carries)")
    tmp = folder.with_name(f".{folder.name}.tmp")  # written whole, then renamed: no half-written part
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, d in parts.items():
        with open(tmp / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    shutil.copy(source / "meta", tmp / "meta")
    old = folder.with_name(f".{folder.name}.old")  # the part it replaces, set aside until the new one is in place
    if folder.is_symlink() or folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)  # a symlink is moved as a link: what it points to is never touched
    tmp.rename(folder)
    if old.is_symlink():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100")
    ap.add_argument("--train-per-class", type=int_in(1, 500), default=100)
    ap.add_argument("--test-per-class", type=int_in(1, 100), default=20)
    ap.add_argument("--out", type=output_folder, required=True, help="a folder; the part goes to OUT/cifar-100-python")
    ap.add_argument("--force", action="store_true", help="replace a part already in --out")
    a = ap.parse_args()
    print(part(a.data_root, a.train_per_class, a.test_per_class, a.out, a.force))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "scripts/cifar_part.py"))
