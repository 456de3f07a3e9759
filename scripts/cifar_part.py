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

from vaqkd.data.build import env_data_root
from vaqkd.data.cifar import get_spec, load_split


def part(data_root: str, train_per_class: int, test_per_class: int, out: Path) -> dict:
    spec = get_spec("cifar100")
    folder = out / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, k in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load_split("cifar100", data_root, split == "train", download_missing=False)
        labels = labels.numpy()
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(spec.num_classes)]))
        if len(keep) != k * spec.num_classes:
            raise SystemExit(f"cifar_part: {split} has fewer than {k} images in some class")
        d = {"batch_label": f"{split}, {k} per class", "fine_labels": labels[keep].tolist(),
             "data": images.numpy()[keep].reshape(len(keep), -1)}  # fmt: skip
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
        counts[split] = len(keep)
    shutil.copy(Path(data_root).expanduser() / spec.folder / "meta", folder / "meta")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    print(part(a.data_root, a.train_per_class, a.test_per_class, a.out))


if __name__ == "__main__":
    main()
