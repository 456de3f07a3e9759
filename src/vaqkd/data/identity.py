"""What a dataset is, by its content rather than its path: a run's `dataset_digest` (env.json) and the part of a
class-folder run's identity that says which folder of images it read.

A run records the digest of the very tensors it trains and evaluates on (images and labels of both splits,
after any subset), and a resume on other data is refused. Two `vaqkd table` cells on two class-folder datasets
differ in identity by `folder_digest` (file list and sizes), so neither is ever reused for the other. CIFAR is
identified by its name: its official files are one dataset wherever they lie (and the digest still checks them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from vaqkd.errors import user_path


def tensor_digest(*tensors: torch.Tensor) -> str:
    """16 hex digits of the bytes, shapes and dtypes of `tensors` (about 0.5 s for all of CIFAR-100)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def folder_digest(root: str | Path) -> str:
    """16 hex digits of a class-folder dataset's file list and sizes under ROOT/train and ROOT/test (hidden
    entries skipped); symlinks are followed, so a linked folder counts by what it holds."""
    root = user_path(root)
    h = hashlib.sha256()
    for split in ("train", "test"):
        base = root / split
        for dirpath, dirnames, filenames in sorted(os.walk(base, followlinks=True)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(f for f in filenames if not f.startswith(".")):
                path = Path(dirpath) / name
                h.update(f"{path.relative_to(root)}|{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
