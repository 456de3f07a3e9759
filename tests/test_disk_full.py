"""A full disk or a read-only folder loses nothing: the failed save's temporary goes, the previous checkpoint stays
and loads, the error is one line ("disk full in DIR (needs ~N MB)"), and --resume continues to the result an
uninterrupted run gives. The failures are injected (OSError(ENOSPC) and the libraries' own messages for it)."""

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vaqkd.rundir.checkpoint as ckpt
from vaqkd.cli import main
from vaqkd.rundir import DiskFullError, RunLock, checkpoints, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _full_after(monkeypatch, calls: int, kind: str = "errno"):
    """safetensors' save_file writes `calls` files, then fails the way a full disk makes it fail, half-writing."""
    real, seen = ckpt.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        seen["n"] += 1
        if seen["n"] <= calls:
            return real(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"\0" * 1000)  # what got written before the space ran out
        if kind == "errno":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors

    monkeypatch.setattr(ckpt, "save_file", save_file)


@pytest.mark.parametrize("kind", ["errno", "safetensors"])
def test_enospc_in_a_save_removes_the_temporary_and_keeps_the_previous_checkpoint(kind, monkeypatch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    model, objective = nn.Linear(300, 1000), nn.Linear(2, 1)
    save_checkpoint(run, model, objective, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    _full_after(monkeypatch, calls=0, kind=kind)
    with pytest.raises(DiskFullError, match=rf"^disk full in {run} \(needs ~2 MB\); free some space") as e:
        save_checkpoint(run, model, objective, {"step": 2})
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000000001"]  # no .ckpt-*.tmp-<pid>/ left behind
    monkeypatch.undo()
    fresh = nn.Linear(300, 1000)
    assert load_checkpoint(run, fresh, nn.Linear(2, 1), torch.device("cpu"))["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_torch_save_failing_without_an_errno_is_told_by_the_free_space(monkeypatch, tmp_path):
    """torch.save reports a full disk as 'unexpected pos 576 vs 534': the free space says what it is."""
    run = tmp_path / "run"
    run.mkdir()

    def torch_save(obj, path):
        Path(path).write_bytes(b"\0" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(DiskFullError, match="disk full in"):
        save_checkpoint(run, nn.Linear(2, 2), nn.Linear(2, 1), {"step": 5})
    assert list(run.iterdir()) == []


def test_a_full_disk_and_a_leftover_temporary_do_not_stop_the_run_lock(monkeypatch, tmp_path):
    run = tmp_path / "run"
    leftover = run / ".ckpt-000000004.tmp-99999"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    with RunLock(run):
        assert not leftover.exists()  # the space it held is free again


TINY = ["--set", 'model.init=""', "--set", "model.arch=resnet20", "--set", "optim.epochs=2", "--set",
        "data.batch_size=100", "--set", "data.subset_per_class=2", "--set", "train.precision=fp32", "--set",
        "train.checkpoint_every_steps=1", "--no-progress"]  # fmt: skip


def test_cli_train_on_a_full_disk_is_one_line_and_resume_gives_the_uninterrupted_result(
    monkeypatch, capsys, shared_cifar_root, tmp_path
):
    base = ["train", str(ROOT / "configs/cifar100/w2a2_qat.toml"), "--data-root", str(shared_cifar_root), *TINY]
    assert main([*base, "--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "r"
    _full_after(monkeypatch, calls=4)  # steps 1 and 2 saved (model + objective each), step 3 fails
    assert main([*base, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"disk full in {run} (needs ~" in err, err
    assert [p.name for p in run.iterdir() if p.name.startswith((".ckpt", "ckpt"))] == ["ckpt-000000002"]
    monkeypatch.undo()  # space freed
    assert main([*base, "--out", str(run), "--resume"]) == 0
    assert [p.name for p in checkpoints(run)] == ["ckpt-000000004"]
    a, b = load_file(ckpt.run_weights(tmp_path / "ref")), load_file(ckpt.run_weights(run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_read_only_out_and_a_file_in_the_path_are_one_line(monkeypatch, capsys, shared_cifar_root, tmp_path):
    base = ["train", str(ROOT / "configs/cifar100/w2a2_qat.toml"), "--data-root", str(shared_cifar_root), *TINY]
    (tmp_path / "a_file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "a_file" / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a_file/r: Not a directory" in err, err
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):  # a read-only file system under `ro`
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main([*base, "--out", str(ro / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{ro / 'r'}: Read-only file system" in err, err


def test_save_artifact_to_a_directory_or_a_read_only_folder_is_one_line(monkeypatch, tmp_path):
    from vaqkd.deploy import artifact, save_artifact
    from vaqkd.errors import RunFileError

    tensors = {"codes": torch.zeros(4, dtype=torch.uint8), "params": torch.zeros(2)}
    with pytest.raises(RunFileError, match="is a directory; give a file name"):
        save_artifact(tmp_path, tensors, {})

    def ro_save(tensors, path, metadata=None):  # what safetensors raises on a read-only file system
        raise Exception(f'Error while serializing: I/O error: Read-only file system (os error 30) at path "{path}"')

    def ro_unlink(self, missing_ok=False):  # a read-only file system refuses even unlinking a missing file
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(artifact, "save_file", ro_save)
    monkeypatch.setattr(Path, "unlink", ro_unlink)
    with pytest.raises(RunFileError, match=rf"{tmp_path}: not writable \(Read-only file system\)$"):
        save_artifact(tmp_path / "m.vaqkd.safetensors", tensors, {})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
