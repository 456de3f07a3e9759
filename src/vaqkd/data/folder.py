"""Class-folder image datasets (`ROOT/train/<class>/*.png`, `ROOT/test/<class>/*`) for users' own data.

Images are decoded once (Pillow), resized to a square side, and cached as one uint8 tensor next to the data,
so a second run starts in seconds. The cache key covers the file list, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from vaqkd.data.cifar import DataError
from vaqkd.errors import user_path

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DECODE = 2  # in the cache key: caches decoded before 16-bit images were scaled (1) are not reused


def _visible(p: Path) -> bool:
    """Not hidden: `.DS_Store`, macOS `._x.png` resource forks, `.ipynb_checkpoints` are never data."""
    return not p.name.startswith(".")


def _list_files(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (image, label) pairs) of one split. Refused, naming the culprit: an empty class folder, a
    folder inside a class folder (images are read from the class folder itself, not below it: a folder there is
    most often a dataset pointed at one level too high), and two class folders that are one folder (a link)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder missing (expected ROOT/train/<class>/*.png and ROOT/test/<class>/*)")
    class_dirs = sorted((p for p in split_dir.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders")
    seen: dict[Path, str] = {}
    for d in class_dirs:
        real = d.resolve()
        if real in seen:
            raise DataError(f"{d}: the same folder as class {seen[real]!r} (a link?); one folder per class")
        seen[real] = d.name
    items = []
    for label, d in enumerate(class_dirs):
        entries = sorted(p for p in d.iterdir() if _visible(p))
        nested = [p for p in entries if p.is_dir()]
        if nested:
            raise DataError(f"{nested[0]}: a folder inside class folder {d.name!r}; put its images in {d} itself "
                            "(images below a class folder are not read)")  # fmt: skip
        images = [(f, label) for f in entries if f.suffix.lower() in EXTENSIONS]
        if not images:
            raise DataError(f"{d}: class folder without images (extensions {EXTENSIONS}); remove it or add images")
        items += images
    return [d.name for d in class_dirs], items


def _rgb(im):
    """An 8-bit RGB image; 16-bit greyscale (mode I;16, or I as some Pillow versions read 16-bit PNGs) is scaled
    to 0-255, where Pillow's convert("RGB") would clip everything above 255 to white. (16-bit colour PNGs are
    read by Pillow as 8-bit RGB already.)"""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" or a.min() < 0 or a.max() > 65535:
            raise ValueError(f"mode {im.mode} with values in [{a.min():g}, {a.max():g}], expected 16-bit [0, 65535]")
        im = Image.fromarray(np.round(a * (255 / 65535)).astype(np.uint8), "L")
    return im.convert("RGB")


def load_folder_split(
    root: str | Path, train: bool, size: int = 32, classes: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Return (images uint8 (N, 3, size, size), labels int64 (N,), class names), decoding at most once.

    `classes`: the training split's class names. Labels are then those classes' indices, matched by name (a
    test split that lacks a class keeps every other label right), and a class the training split does not
    have is an error."""
    from PIL import Image  # Pillow comes with matplotlib; imported here to keep the core light

    split_dir = user_path(root) / ("train" if train else "test")
    own, items = _list_files(split_dir)
    if classes is not None:
        unknown = [c for c in own if c not in classes]
        if unknown:
            raise DataError(f"{split_dir}: class folder(s) {unknown[:5]} not in the training split's classes")
        index = {c: i for i, c in enumerate(classes)}
        items = [(f, index[own[label]]) for f, label in items]
    else:
        classes = own
    key = hashlib.sha1(f"{size}|{DECODE}".encode())
    for f, label in items:
        st = f.stat()
        key.update(f"{f.relative_to(split_dir)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = split_dir.parent / f".vaqkd_cache_{split_dir.name}_{key.hexdigest()[:16]}.pt"
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)  # the listing's: the cache must agree
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            images = blob["images"]
            if images.dtype != torch.uint8 or images.shape != (len(items), 3, size, size):
                problem = f"images {images.dtype} {tuple(images.shape)}"
            elif blob["labels"].dtype != torch.int64 or not torch.equal(blob["labels"], labels):  # as the folders
                problem = "labels differ from the folders'"
            else:
                return images, labels, classes
        except Exception as e:  # truncated or damaged: decode again and rewrite it
            problem = type(e).__name__
        warnings.warn(f"{cache}: damaged decoded-image cache ({problem}); decoding the images again", stacklevel=2)
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, (f, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                images[i] = np.asarray(_rgb(im).resize((size, size), Image.BILINEAR))
        except Exception as e:
            raise DataError(f"{f}: cannot decode image ({e})") from None
    out = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    try:  # written whole, then renamed: a kill mid-save leaves no truncated cache behind
        torch.save({"images": out, "labels": labels}, tmp)
        tmp.replace(cache)
    except (OSError, RuntimeError):  # torch.save reports a read-only or full folder as a RuntimeError
        tmp.unlink(missing_ok=True)  # read-only data folder: still usable, just decoded again next time
    return out, labels, classes
