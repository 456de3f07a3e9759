"""Class-folder image datasets (`ROOT/train/<class>/*.png`, `ROOT/test/<class>/*`) for users' own data.

Images are decoded once (Pillow), resized to a square side, and cached as one uint8 tensor next to the data,
so a second run starts in seconds. The cache key covers the file list, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from vaqkd.data.cifar import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _list_files(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder missing (expected ROOT/train/<class>/*.png and ROOT/test/<class>/*)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{split_dir}: no class folders")
    items = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((split_dir / c).iterdir())
        if f.suffix.lower() in EXTENSIONS
    ]
    if not items:
        raise DataError(f"{split_dir}: no images with extensions {EXTENSIONS}")
    return classes, items


def load_folder_split(root: str | Path, train: bool, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Return (images uint8 (N, 3, size, size), labels int64 (N,), class names), decoding at most once."""
    from PIL import Image  # Pillow comes with matplotlib; imported here to keep the core light

    split_dir = Path(root).expanduser() / ("train" if train else "test")
    classes, items = _list_files(split_dir)
    key = hashlib.sha1(str(size).encode())
    for f, label in items:
        st = f.stat()
        key.update(f"{f.relative_to(split_dir)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = split_dir.parent / f".vaqkd_cache_{split_dir.name}_{key.hexdigest()[:16]}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
        return blob["images"], blob["labels"], classes
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, (f, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                images[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except Exception as e:
            raise DataError(f"{f}: cannot decode image ({e})") from None
    out = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    try:
        torch.save({"images": out, "labels": labels}, cache)
    except OSError:
        pass  # read-only data folder: still usable, just decoded again next time
    return out, labels, classes
