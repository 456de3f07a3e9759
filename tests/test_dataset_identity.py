"""A run's identity includes the dataset it reads by content, not by path."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_cifar100
from vaqkd.config import load_config
from vaqkd.data.identity import folder_digest
from vaqkd.engine.train import fit
from vaqkd.errors import RunFileError
from vaqkd.presets import config_hash

ROOT = Path(__file__).resolve().parents[1]


def _cfg(root, *extra):
    return load_config(None, [f'data.root="{root}"', "model.arch=resnet20", "optim.epochs=1", "data.batch_size=50",
                              "data.subset_per_class=2", "data.test_subset_per_class=1", "train.precision=fp32",
                              *extra])  # fmt: skip


def test_resume_on_other_data_at_another_root_is_refused(tmp_path):
    a = write_cifar100(tmp_path / "a", per_class_train=2, per_class_test=1, seed=0)
    b = write_cifar100(tmp_path / "b", per_class_train=2, per_class_test=1, seed=1)  # other pixels, same layout
    run = tmp_path / "run"
    fit(_cfg(a), run, progress=False, log=lambda s: None, stop_after_steps=1)
    digest = json.loads((run / "env.json").read_text())["dataset_digest"]
    with pytest.raises(RunFileError, match="not the data the run started with"):
        fit(_cfg(b), run, resume=True, progress=False, log=lambda s: None)
    same = write_cifar100(tmp_path / "copy", per_class_train=2, per_class_test=1, seed=0)  # the same data elsewhere
    fit(_cfg(same), run, resume=True, progress=False, log=lambda s: None)
    assert json.loads((run / "env.json").read_text())["dataset_digest"] == digest


def _folder(root: Path, shade: int) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), shade + i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_two_folder_datasets_never_share_a_run_identity(tmp_path):
    a, b = _folder(tmp_path / "a", 10), _folder(tmp_path / "b", 10)
    cfg = lambda root: _cfg(root, 'data.dataset="folder"')  # noqa: E731
    assert folder_digest(a) == folder_digest(b) and config_hash(cfg(a)) == config_hash(cfg(b))  # same content
    (b / "train" / "dog" / "2.png").write_bytes((b / "train" / "dog" / "1.png").read_bytes())
    assert config_hash(cfg(a)) != config_hash(cfg(b))
    (b / "train" / "dog" / ".hidden.png").write_bytes(b"x")  # hidden files are not data
    (a / "train" / "dog" / "2.png").write_bytes((a / "train" / "dog" / "1.png").read_bytes())
    assert config_hash(cfg(a)) == config_hash(cfg(b))


def test_cifar_run_identities_are_unchanged():
    """CIFAR runs keep their identity (committed records are found by it): the hash of a committed record's
    config is still the one in its folder name."""
    records = sorted((ROOT / "results" / "quick" / "runs").glob("qkd_logit-s*"))[:3]
    assert records
    for rec in records:
        cfg = load_config(rec / "config.toml")
        assert rec.name.endswith(config_hash(cfg))
