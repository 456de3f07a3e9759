"""Class-folder datasets lose or corrupt nothing in silence: 16-bit images are scaled, not clipped; an empty class
folder, a folder inside a class folder and two class folders that are one (a link) are refused by name; hidden
files are skipped."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vaqkd.cli import main
from vaqkd.data.cifar import DataError
from vaqkd.data.folder import load_folder_split


def _classes(root, split="train", **counts):
    for c, n in counts.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (30 * i, 60, 90)).save(root / split / c / f"{i}.png")


def _png16(path, a: np.ndarray) -> None:
    """A 16-bit PNG (greyscale (H, W) or RGB (H, W, 3)), written by hand: Pillow cannot write 16-bit colour."""
    h, w = a.shape[:2]
    colour = {2: 0, 3: 2}[a.ndim]
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    _classes(tmp_path, a=1)
    grad = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)  # the full 16-bit range
    (tmp_path / "train" / "b").mkdir()
    Image.fromarray(grad).save(tmp_path / "train" / "b" / "g.png")
    assert Image.open(tmp_path / "train" / "b" / "g.png").mode == "I;16"
    x, y, classes = load_folder_split(tmp_path, True, size=16)
    got = x[y.tolist().index(1)]  # (3, 16, 16), all channels alike
    want = torch.from_numpy(np.round(grad / 257.0)).to(torch.uint8)
    assert torch.equal(got[0], got[2]) and (got[0].int() - want.int()).abs().max() <= 1
    assert (got == 255).float().mean() < 0.02  # was 99.6 % white


def test_16_bit_colour_keeps_its_colours(tmp_path):
    _classes(tmp_path, a=1)
    g = np.linspace(0, 65535, 8 * 8).reshape(8, 8).astype(np.uint16)
    (tmp_path / "train" / "b").mkdir()
    _png16(tmp_path / "train" / "b" / "c.png", np.stack([g, g // 2, 65535 - g], -1))
    x, y, _ = load_folder_split(tmp_path, True, size=8)
    got = x[y.tolist().index(1)].int()
    assert (got[0] - torch.from_numpy(g / 257.0).round().int()).abs().max() <= 1
    assert (got[2] - torch.from_numpy((65535 - g) / 257.0).round().int()).abs().max() <= 1


def test_an_empty_class_folder_is_refused_by_name(tmp_path, capsys):
    _classes(tmp_path, a=2, c=2)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"train/b: class folder without images"):
        load_folder_split(tmp_path, True, size=8)
    _classes(tmp_path, "test", a=1)
    args = ["train", "configs/cifar100/w2a2_qat.toml", "--out", str(tmp_path / "r"), "--data-root", str(tmp_path),
            "--set", "data.dataset=folder", "--set", 'model.init=""']  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train/b: class folder without images" in err, err


def test_a_folder_inside_a_class_folder_is_refused_by_name(tmp_path):
    _classes(tmp_path, a=2, b=2)
    (tmp_path / "train" / "b" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b" / "more" / "x.png")
    with pytest.raises(DataError, match=r"train/b/more: a folder inside class folder 'b'"):
        load_folder_split(tmp_path, True, size=8)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    _classes(tmp_path, a=2, b=3)
    (tmp_path / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "b" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (tmp_path / "train" / ".hidden_class").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / ".hidden_class" / "0.png")
    x, y, classes = load_folder_split(tmp_path, True, size=8)
    assert classes == ["a", "b"] and y.tolist() == [0, 0, 1, 1, 1]


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
    _classes(tmp_path, cat=2, dog=2)
    (tmp_path / "train" / "kitty").symlink_to(tmp_path / "train" / "cat", target_is_directory=True)
    with pytest.raises(DataError, match=r"train/kitty: the same folder as class 'cat'"):
        load_folder_split(tmp_path, True, size=8)
    elsewhere = tmp_path / "elsewhere" / "bird"
    _classes(tmp_path / "elsewhere", "", bird=1)
    (tmp_path / "train" / "kitty").unlink()
    (tmp_path / "train" / "bird").symlink_to(elsewhere, target_is_directory=True)  # a link to its own images: fine
    assert load_folder_split(tmp_path, True, size=8)[2] == ["bird", "cat", "dog"]


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    """torch.save reports a read-only or full data folder as a RuntimeError, not an OSError."""
    import vaqkd.data.folder as folder

    _classes(tmp_path, a=1, b=1)

    def read_only(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only")

    monkeypatch.setattr(folder.torch, "save", read_only)
    x, y, _ = load_folder_split(tmp_path, True, size=8)
    assert x.shape == (2, 3, 8, 8) and not list(tmp_path.glob(".vaqkd_cache*"))


def test_flat_images_are_refused_and_a_constant_channel_normalises_to_zero_not_nan(tmp_path):
    from vaqkd.config import load_config
    from vaqkd.data.build import build_data

    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cfg = load_config(None, ["data.dataset=folder", ("data.root", str(tmp_path)), "data.batch_size=2",
                             "data.image_size=8", "train.device=cpu"])  # fmt: skip
    with pytest.raises(DataError, match="every image is one flat colour"):
        build_data(cfg, torch.device("cpu"))
    for c in ("a", "b"):  # red varies, green and blue stay constant
        for i in range(3):
            Image.new("RGB", (8, 8), (80 * i, 60, 90)).save(tmp_path / "train" / c / f"{i}.png")
        Image.new("RGB", (8, 8), (200, 60, 90)).save(tmp_path / "test" / c / "0.png")
    data = build_data(cfg, torch.device("cpu"))
    x, _, _ = next(iter(data.train.batches(0)))  # augmented: zero padding at the borders stays small
    assert torch.isfinite(x).all() and x.abs().max() < 10
    x, _, _ = next(iter(data.test))  # the test split: green and blue centred to 0, red scaled
    assert x[:, 1:].abs().max() < 0.02 and x[:, 0].abs().max() > 0.5
