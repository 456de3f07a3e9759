"""Nothing lost, nothing wrong in silence: divergence, crash consistency, damaged files, the run lock, resumes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaqkd.cli import main
from vaqkd.config import load_config
from vaqkd.engine.train import fit
from vaqkd.errors import RunFileError, RunLockedError, TrainingDiverged
from vaqkd.rundir import RunLock, checkpoints, load_checkpoint, run_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.batch_size=100", "data.eval_batch_size=200", "model.arch=resnet20", "optim.epochs=1",
        "optim.schedule=cosine", "train.precision=fp32", "train.device=cpu"]  # fmt: skip


def cfg_for(root, *extra):
    overrides = TINY + [("data.root", str(root)), 'model.init=""', *extra]
    return load_config(ROOT / "configs/cifar100/w2a2_qat.toml", overrides)


def quiet(_):
    pass


def test_a_diverged_run_stops_keeps_its_last_good_checkpoint_and_says_where(shared_cifar_root, tmp_path):
    cfg = cfg_for(shared_cifar_root, "optim.lr=1e8", "train.checkpoint_every_steps=1")
    with pytest.raises(TrainingDiverged, match=r"non-finite at step \d+ .*non-finite: (ce|weights)") as e:
        fit(cfg, tmp_path / "r", progress=False, log=quiet)
    failed = json.loads((tmp_path / "r" / "failed.json").read_text())
    assert failed["step"] >= 1 and failed["parts"] and str(failed["step"]) in str(e.value)
    assert not (tmp_path / "r" / "final.json").exists()
    cks = checkpoints(tmp_path / "r")  # only steps before the first bad one were kept, and they are finite
    assert cks and int(cks[-1].name[5:]) <= failed["step"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(run_weights(tmp_path / "r")).values())


def test_cli_exit_code_for_divergence_and_the_runner_marks_the_cell_failed(shared_cifar_root, tmp_path, capsys):
    args = ["train", "configs/cifar100/w2a2_qat.toml", "--out", str(tmp_path / "r"), "--data-root",
            str(shared_cifar_root), "--no-progress", *[a for s in TINY + ['model.init=""', "optim.lr=1e8"]
                                                       for a in ("--set", s)]]  # fmt: skip
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite" in err and "Traceback" not in err
    from vaqkd.runner import run_or_reuse

    logs = []
    assert run_or_reuse(cfg_for(shared_cifar_root, "optim.lr=1e8"), tmp_path / "r", logs.append) is None
    assert "FAILED" in logs[-1]  # not retried, not reused as finished


def test_kill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path):
    """SIGKILL/SIGTERM inside and between checkpoint saves (benchmarks/kill_resume.py in the default mode: auto
    precision, every thread; a few kills here, results/reliability a longer series), each followed by --resume:
    identical final metrics and weights."""
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/kill_resume.py"), "--kills", "4", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    res = json.loads(out.read_text())
    assert p.returncode == 0 and res["identical"] and res["kills"] == 4, (p.stdout, p.stderr[-2000:])
    assert res["mode"] == "default" and res["settings"] == []


def _weights(run):
    from safetensors.torch import load_file

    return load_file(run_weights(run))


# bf16 at one thread on 200 images (4 steps): on a CPU without bf16 instructions (AMD Zen 3) each step is ~15x
# an fp32 one, and 4 steps show a repeat as well as 12
BF16 = ["train.precision=bf16", "train.threads=1", "data.subset_per_class=2"]


@pytest.mark.parametrize("sets", [[], BF16], ids=["default", "bf16-1-thread"])
def test_the_same_run_twice_gives_the_same_weights(sets, shared_cifar_root, tmp_path):
    """The default mode (auto precision: fp32 on CPUs; every thread) and bf16 on one thread repeat themselves bit
    for bit: two uninterrupted runs of one config end with equal weights and metrics."""
    cfg = load_config(None, [f'data.root="{shared_cifar_root}"', "model.arch=resnet20", "quant.enabled=true",
                             "optim.epochs=1", "data.batch_size=50", *sets])  # fmt: skip
    finals = []
    for name in ("a", "b"):
        fit(cfg, tmp_path / name, progress=False, log=quiet)
        finals.append(json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1]))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in finals[0].items() if "seconds" not in k and "per_s" not in k} == {
        k: v for k, v in finals[1].items() if "seconds" not in k and "per_s" not in k}


def test_auto_precision_is_fp32_on_cpus():
    from vaqkd.engine.setup import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_comparison_in_the_kill_benchmark_sees_a_difference():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kill_resume import same

    a = {"final": {"top1_last": 1.0}, "metrics": [{"train_loss": 2.0}], "weights": {"w": torch.zeros(3)}}
    b = {**a, "weights": {"w": torch.tensor([0.0, 0.0, 1e-7])}}
    assert same(a, a) and not same(a, b) and not same(a, {**a, "metrics": [{"train_loss": 2.0001}]})


@pytest.fixture
def finished_run(shared_cifar_root, tmp_path):
    run = tmp_path / "run"
    fit(cfg_for(shared_cifar_root), run, progress=False, log=quiet)
    return run


def test_damaged_run_files_are_named_in_one_line(finished_run, shared_cifar_root, capsys):
    weights = run_weights(finished_run)
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    assert main(["eval", str(finished_run), "--data-root", str(shared_cifar_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(weights) in err and "damaged" in err
    weights.write_bytes(good)
    state = weights.parent / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(RunFileError, match=r"state\.pt: damaged"):
        load_checkpoint(finished_run, *_model_and_objective(finished_run))
    (finished_run / "final.json").write_text('{"top1_last": 1')
    from vaqkd.runner import run_or_reuse

    with pytest.raises(RunFileError, match=r"final\.json: damaged"):
        run_or_reuse(load_config(finished_run / "config.toml"), finished_run, quiet)
    (finished_run / "config.toml").write_text("[optim\nlr = ")
    assert main(["eval", str(finished_run)]) == 2
    assert "config.toml: invalid TOML" in capsys.readouterr().err


def _model_and_objective(run):
    from vaqkd.distill.objective import Objective, build_term
    from vaqkd.models import stage_channels
    from vaqkd.rundir import build_student

    cfg = load_config(run / "config.toml", ['model.init=""'])
    model = build_student(cfg, 100, torch.device("cpu"))
    ch = stage_channels(model)
    terms = [build_term(t, ch, ch, torch.zeros(600, dtype=torch.long)) for t in cfg.distill.terms]
    return model, Objective(cfg.distill.terms, terms), torch.device("cpu")


def test_foreign_and_mismatched_checkpoints_are_refused(finished_run, shared_cifar_root, tmp_path, capsys):
    other = tmp_path / "other"
    fit(load_config(None, TINY + [("data.root", str(shared_cifar_root)), "model.arch=resnet32"]), other, progress=False,
        log=quiet)  # fmt: skip
    run_weights(finished_run).write_bytes(run_weights(other).read_bytes())  # a resnet32's weights in a resnet20 run
    assert main(["eval", str(finished_run), "--data-root", str(shared_cifar_root)]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "Traceback" not in err
    ck = checkpoints(other)[-1]  # weights stamped with another step than the checkpoint's
    ck.rename(ck.with_name("ckpt-000000001"))
    with pytest.raises(RunFileError, match="stamped step"):
        load_checkpoint(other, *_model_and_objective(other))


def test_a_second_writer_is_told_who_holds_the_run(shared_cifar_root, tmp_path):
    run = tmp_path / "r"
    with RunLock(run):
        with pytest.raises(RunLockedError, match=r"in use by pid \d+ on .* since"):
            fit(cfg_for(shared_cifar_root), run, progress=False, log=quiet)
    fit(cfg_for(shared_cifar_root), run, progress=False, log=quiet)  # released: now it runs


def test_a_start_that_fails_before_its_first_checkpoint_leaves_the_folder_as_it_found_it(shared_cifar_root, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    import vaqkd.engine.train as train_mod
    from vaqkd.errors import ConfigError

    bad = cfg_for(shared_cifar_root, "train.sync_bn=true")  # refused on CPUs after config.toml is written
    with pytest.raises(ConfigError, match="sync_bn"):
        fit(bad, tmp_path / "new" / "r", progress=False, log=quiet)
    assert not (tmp_path / "new" / "r").exists()  # made by the attempt: gone (its parent, made too, stays)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".notes").write_text("kept")  # a hidden file (an editor's, a sync tool's): not in a run's way
    with pytest.raises(ConfigError, match="sync_bn"):
        fit(bad, mine, progress=False, log=quiet)
    assert [p.name for p in mine.iterdir()] == [".notes"]  # no config.toml or .lock left

    def fails_in_the_first_epoch(run, *args):  # after env.json; meanwhile someone else writes beside the run
        assert (run.run_dir / "env.json").exists() and (run.run_dir / "config.toml").exists()
        (run.run_dir / "theirs.txt").write_text("not the run's")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_mod, "_loop", fails_in_the_first_epoch)
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(cfg_for(shared_cifar_root), mine, progress=False, log=quiet)
    assert sorted(p.name for p in mine.iterdir()) == [".notes", "theirs.txt"]  # only what a start writes goes
    (mine / "theirs.txt").unlink()
    monkeypatch.undo()
    with pytest.raises(RunFileError, match="no checkpoint to resume from"):
        fit(cfg_for(shared_cifar_root), mine, resume=True, progress=False, log=quiet)
    assert [p.name for p in mine.iterdir()] == [".notes"]
    with pytest.raises(RunFileError, match="no such run directory to resume"):
        fit(cfg_for(shared_cifar_root), tmp_path / "absent", resume=True, progress=False, log=quiet)
    assert not (tmp_path / "absent").exists()
    fit(cfg_for(shared_cifar_root), mine, progress=False, log=quiet)  # the folder takes a run afterwards
    assert (mine / "final.json").exists() and (mine / ".notes").exists()


def test_a_fresh_run_is_not_started_among_files_no_run_writes(shared_cifar_root, tmp_path, capsys):
    """An --out that names a dataset or a project folder is refused before any work, nothing written there; a
    folder holding only a run's own files (a start killed before its first checkpoint) takes the run."""
    data = tmp_path / "images"
    data.mkdir()
    for name in ("a.png", "b.png", "c.png", "labels.csv"):
        (data / name).write_text("theirs")
    with pytest.raises(RunFileError, match=r"images: not empty and not a run directory \(holds a.png, b.png, c.png "
                                           r"and 1 more\); choose a new or empty --out"):  # fmt: skip
        fit(cfg_for(shared_cifar_root), data, progress=False, log=quiet)
    assert sorted(p.name for p in data.iterdir()) == ["a.png", "b.png", "c.png", "labels.csv"]
    config = Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "w2a2_qat.toml"
    assert main(["train", str(config), "--out", str(data), "--data-root", str(shared_cifar_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty and not a run directory" in err and "\n" not in err
    a_file = tmp_path / "model.onnx"
    a_file.write_text("x")
    with pytest.raises(RunFileError, match="model.onnx: is a file, not a directory"):
        fit(cfg_for(shared_cifar_root), a_file, progress=False, log=quiet)
    (data / "ckpt-notes.txt").write_text("theirs")  # named like a checkpoint, but not one
    with pytest.raises(RunFileError, match=r"holds a.png, b.png, c.png and 2 more"):
        fit(cfg_for(shared_cifar_root), data, progress=False, log=quiet)
    killed = tmp_path / "killed"  # what a start killed before its first checkpoint leaves
    killed.mkdir()
    for name in ("config.toml", "env.json", ".lock", "metrics.jsonl"):
        (killed / name).write_text("")
    (killed / "tensorboard").mkdir()
    fit(cfg_for(shared_cifar_root), killed, progress=False, log=quiet)
    assert (killed / "final.json").exists()
    (killed / "model.onnx").write_text("an export beside the run")  # a run's folder: said to hold a run
    with pytest.raises(FileExistsError, match="holds a run already; pass --resume or choose another --out"):
        fit(cfg_for(shared_cifar_root), killed, progress=False, log=quiet)


def test_the_lock_is_taken_on_the_file_in_the_folder_not_on_one_a_failed_start_removed(tmp_path, monkeypatch):
    """Between opening `.lock` and locking it, a failed start may remove the file (`RunLock._tidy_failed_start`):
    a lock on the removed file would guard nothing, so the lock is taken again on the file now in the folder."""
    import fcntl
    import os

    run = tmp_path / "r"
    run.mkdir()
    real, calls = fcntl.flock, []

    def flock_after_a_removal(fd, op):
        calls.append(op)
        if len(calls) == 1:
            (run / ".lock").unlink()  # the other start's tidy-up, just before this lock
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_removal)
    with RunLock(run) as lock:
        assert os.stat(run / ".lock").st_ino == os.fstat(lock.fd).st_ino
        monkeypatch.setattr(fcntl, "flock", real)
        with pytest.raises(RunLockedError):
            RunLock(run).__enter__()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / ".lock").symlink_to(tmp_path / "nowhere" / "lock")  # in the way, not a vanishing folder: said at once
    with pytest.raises(FileNotFoundError):
        RunLock(odd).__enter__()
    locks = [c for c in calls if c != fcntl.LOCK_UN]
    assert locks[:2] == [fcntl.LOCK_EX | fcntl.LOCK_NB] * 2  # locked twice: the removed file, then the new one


def test_resume_keeps_the_environment_that_started_the_run(shared_cifar_root, tmp_path):
    cfg = cfg_for(shared_cifar_root, "optim.epochs=2")
    fit(cfg, tmp_path / "r", progress=False, log=quiet, stop_after_steps=3)
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    fit(cfg, tmp_path / "r", resume=True, progress=False, log=quiet)
    after = json.loads((tmp_path / "r" / "env.json").read_text())
    assert after["git_sha"] == env["git_sha"] and after["resumes"][0]["at_step"] == 3
    assert {k: v for k, v in after.items() if k != "resumes"} == env
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    assert final["cpu_capability"] == env["cpu_capability"] != ""


def _folder(root: Path, split: str, classes: dict[str, int]):
    from PIL import Image

    for c, n in classes.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (10 * i, 50, ord(c[0]))).save(root / split / c / f"{i}.png")


def test_folder_test_labels_follow_the_training_classes_by_name(tmp_path):
    from vaqkd.data.cifar import DataError
    from vaqkd.data.folder import load_folder_split

    _folder(tmp_path, "train", {"apple": 2, "bear": 2, "cat": 2})
    _folder(tmp_path, "test", {"apple": 1, "cat": 1})  # no bear: cat must stay 2, not become 1
    _, ytr, classes = load_folder_split(tmp_path, True, 8)
    _, yte, _ = load_folder_split(tmp_path, False, 8, classes=classes)
    assert classes == ["apple", "bear", "cat"] and yte.tolist() == [0, 2]
    _folder(tmp_path, "test", {"dog": 1})
    with pytest.raises(DataError, match=r"\['dog'\] not in the training split"):
        load_folder_split(tmp_path, False, 8, classes=classes)


def test_folder_cache_damaged_is_decoded_again_and_bad_images_are_named(tmp_path):
    from vaqkd.data.cifar import DataError
    from vaqkd.data.folder import load_folder_split

    _folder(tmp_path, "train", {"a": 2, "b": 2})
    x, y, _ = load_folder_split(tmp_path, True, 8)
    (cache,) = tmp_path.glob(".vaqkd_cache_train_*.pt")
    cache.write_bytes(cache.read_bytes()[:50])  # a kill mid-save in the old code
    with pytest.warns(UserWarning, match="damaged decoded-image cache"):
        x2, y2, _ = load_folder_split(tmp_path, True, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "train" / "b" / "9.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"9\.png: cannot decode image"):
        load_folder_split(tmp_path, True, 8)


@pytest.mark.parametrize("edit,problem", [
    (lambda x, y: (x, y + 50), "labels differ from the folders'"),  # out of range
    (lambda x, y: (x, y.flip(0)), "labels differ from the folders'"),  # in range, in the wrong places
    (lambda x, y: (x, y.float()), "labels differ from the folders'"),
    (lambda x, y: (x.float(), y), "images torch.float32"),
])  # fmt: skip
def test_a_folder_cache_whose_contents_do_not_fit_the_folders_is_decoded_again(edit, problem, tmp_path):
    """A cache of the right shape is still checked: uint8 images, and exactly the labels the folders give (a
    damaged or edited cache must not train on wrong labels, nor end in a traceback)."""
    from vaqkd.data.folder import load_folder_split

    _folder(tmp_path, "train", {"a": 2, "b": 2})
    x, y, _ = load_folder_split(tmp_path, True, 8)
    (cache,) = tmp_path.glob(".vaqkd_cache_train_*.pt")
    bad_x, bad_y = edit(x, y)
    torch.save({"images": bad_x, "labels": bad_y}, cache)
    with pytest.warns(UserWarning, match=f"damaged decoded-image cache \\({problem}"):
        x2, y2, _ = load_folder_split(tmp_path, True, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2) and y2.dtype == torch.int64
    assert torch.equal(torch.load(cache, weights_only=True)["labels"], y)  # rewritten whole


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    import vaqkd.metrics.size as size

    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(size, "profile", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # not swallowed into one line
        main(["profile"])
