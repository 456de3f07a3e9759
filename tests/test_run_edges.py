"""Edges of runs and their readers: a torn last metrics line, --resume on a finished run, run names that are
paths, `vaqkd gradcam` given impossible requests, and `vaqkd eval ARTIFACT` in fp32 with the header's
normalisation."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import one_line_error as one_line
from vaqkd.cli import main
from vaqkd.config import load_config
from vaqkd.engine.train import fit
from vaqkd.errors import ConfigError
from vaqkd.rundir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]



def _folder(root: Path, classes: int, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * c + 10 * i, 20 * i + c, 200 - 30 * i - c)).save(
                    root / split / f"c{c}" / f"{i}.png"
                )
    return root


def _folder_run(tmp_path, name, classes):
    data = _folder(tmp_path / f"data{classes}", classes)
    sets = ["data.dataset=folder", f'data.root="{data}"', "data.image_size=8", f"data.batch_size={classes}",
            "model.arch=resnet20", "optim.epochs=1", "train.precision=fp32"]  # fmt: skip
    fit(load_config(None, sets), tmp_path / name, progress=False, log=lambda s: None)
    return tmp_path / name, data


@pytest.mark.parametrize("name", ['""', '"../../x"', '"a/b"', '".."', '"a\\\\b"'])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", str(ROOT / "configs/cifar100/w2a2_qat.toml"), "--set", f"name={name}"]
    one_line(capsys, args, "name: must be a plain folder name")
    assert list(tmp_path.iterdir()) == []


def test_a_torn_metrics_line_does_not_block_resume_and_a_finished_run_is_not_redone(shared_cifar_root, tmp_path,
                                                                                      capsys):  # fmt: skip
    sets = [f'data.root="{shared_cifar_root}"', "data.subset_per_class=2", "data.batch_size=100", "optim.epochs=2",
            "model.arch=resnet20", "train.precision=fp32"]  # fmt: skip
    cfg, run = load_config(None, sets), tmp_path / "r"
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=2)  # epoch 1 of 2 done
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss": 4.6')  # a kill or a full disk mid-write
    final = fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2] and final["top1_last"] >= 0
    before, mtime = (run / "final.json").read_bytes(), (run / "final.json").stat().st_mtime_ns
    lines = []
    again = fit(cfg, run, resume=True, progress=False, log=lines.append)
    assert again == final and any("already finished" in s for s in lines)
    assert (run / "final.json").read_bytes() == before and (run / "final.json").stat().st_mtime_ns == mtime
    # through the CLI: exit 0 and the run's result
    args = ["train", str(run / "config.toml"), "--out", str(run), "--resume", "--no-progress"]
    assert main(args) == 0
    assert "already finished" in capsys.readouterr().out and (run / "final.json").read_bytes() == before


def test_an_unfinished_run_as_teacher_is_said(shared_cifar_root, tmp_path):
    """A run directory that has not finished may teach or start a student (its latest checkpoint), but the
    student's log says so."""
    base = [f'data.root="{shared_cifar_root}"', "data.subset_per_class=2", "data.batch_size=100", "optim.epochs=2",
            "model.arch=resnet20", "train.precision=fp32"]  # fmt: skip
    teacher = tmp_path / "teacher"
    fit(load_config(None, base), teacher, progress=False, log=lambda s: None, stop_after_steps=1)
    student = load_config("configs/cifar100/vaqkd_logit.toml",
                          [*base, 'model.init=""', f'distill.teacher="{teacher}"', 'distill.teacher_arch="resnet20"'])
    lines = []
    fit(student, tmp_path / "student", progress=False, log=lines.append, stop_after_steps=1)
    assert any(f"distill.teacher {teacher} has not finished" in s and "ckpt-000000001" in s for s in lines), lines
    # the same run as the student's start: said too
    started = load_config("configs/cifar100/vaqkd_logit.toml",
                          [*base, f'model.init="{teacher}"', f'distill.teacher="{teacher}"',
                           'distill.teacher_arch="resnet20"'])  # fmt: skip
    lines = []
    fit(started, tmp_path / "started", progress=False, log=lines.append, stop_after_steps=1)
    assert any(f"model.init {teacher} has not finished" in s and s.endswith("is the start") for s in lines), lines


def test_a_resume_already_at_its_stop_step_trains_nothing(shared_cifar_root, tmp_path):
    """--stop-after-steps N on a run that is at step N or beyond stops at once (it used to train one more stretch
    before looking); below 1 it is refused before any work."""
    sets = [f'data.root="{shared_cifar_root}"', "data.subset_per_class=4", "data.batch_size=100", "optim.epochs=2",
            "model.arch=resnet20", "train.precision=fp32", "train.checkpoint_every_steps=1"]  # fmt: skip
    cfg, run = load_config(None, sets), tmp_path / "r"
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=2)
    state = sorted(run.glob("ckpt-*"))
    assert [c.name for c in state] == ["ckpt-000000002"]
    for n in (1, 2):
        lines = []
        assert fit(cfg, run, resume=True, progress=False, log=lines.append, stop_after_steps=n) == {}
        assert sorted(c.name for c in run.glob("ckpt-*")) == ["ckpt-000000002"], n
        assert any("stopped at step 2" in s for s in lines), lines
    with pytest.raises(ConfigError, match="--stop-after-steps 0: must be >= 1"):
        fit(cfg, tmp_path / "new", progress=False, log=lambda s: None, stop_after_steps=0)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage,culprit", [
    ('{"epoch": 1, "loss": 4.6\n{"epoch": 2}', "metrics.jsonl:1: damaged line (not JSON)"),  # torn, but not last
    ('[1, 2]', "metrics.jsonl:1: damaged line (a JSON list, not an object)"),
    ('{"loss": 4.6}', "metrics.jsonl:1: damaged line ('epoch' missing or not int)"),
    ('{"epoch": "1"}', "metrics.jsonl:1: damaged line ('epoch' missing or not int)"),
    (b'{"epoch": 1}\xff', "metrics.jsonl: damaged (not UTF-8 text)"),
])  # fmt: skip
def test_damaged_metrics_lines_before_the_last_are_named_on_a_resume_and_the_checkpoint_kept(
        damage, culprit, shared_cifar_root, tmp_path, capsys):  # fmt: skip
    sets = [f'data.root="{shared_cifar_root}"', "data.subset_per_class=2", "data.batch_size=100", "optim.epochs=2",
            "model.arch=resnet20", "train.precision=fp32"]  # fmt: skip
    cfg, run = load_config(None, sets), tmp_path / "r"
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=2)  # epoch 1 of 2 done
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    ckpt = sorted(p.name for p in run.iterdir())
    args = ["train", str(run / "config.toml"), "--out", str(run), "--resume", "--no-progress"]
    one_line(capsys, args, culprit)
    assert sorted(p.name for p in run.iterdir()) == ckpt and not (run / "final.json").exists()
    assert metrics.read_bytes() == (damage if isinstance(damage, bytes) else damage.encode())  # left to be mended


def test_gradcam_impossible_requests_are_one_line(tmp_path, capsys):
    a, data2 = _folder_run(tmp_path, "a", 2)
    b, _ = _folder_run(tmp_path, "b", 3)
    base = ["gradcam", str(a), str(a), "--data-root", str(data2)]
    one_line(capsys, [*base, "--images", "5"], "--images 5: the test split of", "has only 4 images")
    one_line(capsys, ["gradcam", str(a), str(b)], "of folder with 2 classes", "of folder with 3")
    (tmp_path / "figs").mkdir()
    one_line(capsys, [*base, "--out", str(tmp_path / "figs")], "figs: is a directory; give a file name")
    assert main([*base, "--images", "2", "--out", str(tmp_path / "figs" / "g")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'figs' / 'g.png'}"  # the file it wrote
    assert (tmp_path / "figs" / "g.png").exists() and not (tmp_path / "figs" / "g").exists()


def test_eval_of_an_artifact_is_fp32_with_the_headers_normalisation(tmp_path, monkeypatch, capsys):
    import vaqkd.engine.setup as setup
    import vaqkd.engine.step as train  # where cli eval takes evaluate from
    from vaqkd.deploy import pack_model, save_artifact
    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize

    data = _folder(tmp_path / "data", 2)
    model = quantize(create_model("resnet20", 2), 2, 2)
    calibrate(model, [torch.randn(4, 3, 8, 8)])
    tensors, summary = pack_model(model.eval())
    mean, std = [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]  # not what the images at --data-root give
    header = {"format": "vaqkd-packed", "version": 2, "arch": "resnet20", "num_classes": 2, "dataset": "folder",
              "image_size": 8, "mean": mean, "std": std, "quant": {"w_bits": 2, "a_bits": 2, "weight": "lsq",
              "act": "lsq", "per_channel": False, "first_last": "fp32"}, **summary, "source_run": "r",
              "git_sha": None, "top1_last": None}  # fmt: skip
    art = save_artifact(tmp_path / "m.vaqkd.safetensors", tensors, header)
    asked, seen = [], {}
    real_resolve = setup.resolve_precision

    def resolve(p, device):
        asked.append(p)
        return real_resolve(p, device)

    def evaluate(model, loader, precision="fp32"):
        seen.update(mean=loader.mean.flatten() / 255, std=loader.std.flatten() / 255, precision=precision)
        return {"top1": 0.0}

    monkeypatch.setattr(setup, "resolve_precision", resolve)
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert main(["eval", str(art), "--data-root", str(data)]) == 0
    assert asked == ["fp32"] and seen["precision"] == "fp32"
    assert torch.allclose(seen["mean"], torch.tensor(mean)) and torch.allclose(seen["std"], torch.tensor(std))
    # a folder of other classes at --data-root: named, not a top-1 over labels the model has no logit for
    one_line(capsys, ["eval", str(art), "--data-root", str(_folder(tmp_path / "data3", 3))],
             "m.vaqkd.safetensors: a model of 2 classes; the folder test split here has 3")  # fmt: skip
    pytest.importorskip("onnxruntime")
    one_line(capsys, ["eval", str(art), "--backend", "onnxruntime", "--data-root", str(tmp_path / "data3")],
             "m.vaqkd.safetensors (exported for onnxruntime): gives 2 classes; the test split has 3")  # fmt: skip
