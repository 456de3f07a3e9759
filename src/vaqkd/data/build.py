"""A config's datasets on the device: the training and test loaders a run (or an evaluation) reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vaqkd.config import Config, DataConfig
from vaqkd.data.cifar import SPECS, DataError, load_split, split_present
from vaqkd.data.identity import tensor_digest
from vaqkd.data.loader import DeviceLoader, subset_per_class
from vaqkd.errors import ConfigError, user_path


def env_data_root() -> str | None:
    """$VAQKD_DATA, the datasets' folder when no --data-root is given (VAQKD_DATA="": unset)."""
    return os.environ.get("VAQKD_DATA") or None


def data_root(cfg: DataConfig) -> Path:
    return user_path(cfg.root or env_data_root() or "data")


def data_present(cfg: DataConfig) -> bool:
    """Whether the config's dataset is on this machine already (nothing downloaded, nothing read)."""
    root = data_root(cfg)
    if cfg.dataset == "folder":
        return (root / "train").is_dir() and (root / "test").is_dir()
    return cfg.dataset in SPECS and split_present(cfg.dataset, root, True) and split_present(cfg.dataset, root, False)


@dataclass
class Data:
    train: DeviceLoader
    test: DeviceLoader
    num_classes: int
    train_labels: torch.Tensor  # labels of the (subset) training set, in loader index order
    digest: str = ""  # the content of both splits as loaded (`data.identity.tensor_digest`)


def build_data(cfg: Config, device: torch.device, shard: tuple[int, int] = (0, 1)) -> Data:
    """The run's splits on the device; `shard` = (rank, world): the training loader yields this process's rows
    of every global batch (`data.batch_size`)."""
    d = cfg.data
    root = data_root(d)
    if d.dataset == "folder":
        from vaqkd.data.folder import load_folder_split

        xtr, ytr, classes = load_folder_split(root, True, d.image_size)
        xte, yte, _ = load_folder_split(root, False, d.image_size, classes=classes)
        x = xtr.float() / 255
        mean, std = tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())
        if max(std) < 1e-3:  # every pixel the same value: nothing to learn from (normalising would divide by 0)
            raise DataError(f"{root / 'train'}: every image is one flat colour (pixel std {max(std):.2g}); nothing "
                            "to learn from")  # fmt: skip
        std = tuple(s if s >= 1e-3 else 1.0 for s in std)  # a channel constant over the set: centred, not NaN
        num_classes = len(classes)
    else:
        xtr, ytr = load_split(d.dataset, root, train=True)
        xte, yte = load_split(d.dataset, root, train=False)
        spec = SPECS[d.dataset]
        mean, std, num_classes = spec.mean, spec.std, spec.num_classes
    keep = subset_per_class(ytr, d.subset_per_class)
    xtr, ytr = xtr[keep], ytr[keep]
    keep = subset_per_class(yte, d.test_subset_per_class)
    xte, yte = xte[keep], yte[keep]
    if d.batch_size > len(ytr):
        raise ConfigError(f"data.batch_size: {d.batch_size} is larger than the {len(ytr)} training images")
    cl = cfg.train.channels_last
    train = DeviceLoader(xtr, ytr, d.batch_size, mean, std, device, train=True, seed=cfg.train.seed, channels_last=cl,
                         shard=shard)  # fmt: skip
    test = DeviceLoader(xte, yte, d.eval_batch_size, mean, std, device, train=False, channels_last=cl)
    return Data(train, test, num_classes, ytr, tensor_digest(xtr, ytr, xte, yte))


