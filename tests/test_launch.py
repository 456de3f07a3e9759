"""Many cells at once: the table's local process pool (--jobs) and the Ray launcher."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vaqkd.launch import run_cells
from vaqkd.presets import config_hash, load_preset, row_config
from vaqkd.runner import TableIncomplete, row_result, run_table


def _sets(root):
    tiny = ["optim.epochs=1", "data.subset_per_class=2", "data.batch_size=50", "data.test_subset_per_class=1"]
    arch = ["model.arch=resnet20", "distill.teacher_arch=resnet20", "train.precision=fp32"]
    return [("data.root", str(root)), *arch, *tiny]


def _overlap(timings) -> bool:
    a, b = timings
    return a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]


def _fail(tmp_path, teacher, sets, row, seed):
    """Mark a cell failed, as a diverged run leaves it (failed.json): the table reports it and goes on."""
    cfg = row_config(row, load_preset("demo"), seed, teacher, sets)
    d = tmp_path / "runs" / f"{row}-s{seed}-{config_hash(cfg)}"
    d.mkdir(parents=True)
    (d / "failed.json").write_text(json.dumps({"reason": "marked by the test"}))
    return d


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_cells_run_side_by_side_are_reused_and_one_failed_cell_does_not_stop_the_others(
    launcher, shared_cifar_root, tiny_teacher, tmp_path, request
):
    if launcher == "ray":
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, include_dashboard=False)  # one local Ray for the whole test (the launcher reuses it)
        request.addfinalizer(ray.shutdown)
    sets, teacher = _sets(shared_cifar_root), str(tiny_teacher)
    task = (row_result, load_preset("demo"), teacher, sets, tmp_path / "runs", None)
    cells = [("w2a2_qat", 0), ("qkd_logit", 0)]
    done = list(run_cells(cells, task, launcher, 2, None, 1, 0.0, print))
    assert sorted(c for c, _, _ in done) == sorted(cells) and all(f is not None for _, f, _ in done)
    assert _overlap([t for _, _, t in done]), [t for _, _, t in done]  # two processes, at the same time
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):  # each worker tuned its allocator
        envs = [json.loads(e.read_text()) for e in (tmp_path / "runs").glob("*/env.json")]
        assert len(envs) == 2 and all(e["malloc_tuned"] for e in envs), [e["malloc_tuned"] for e in envs]

    failed = _fail(tmp_path, teacher, sets, "qkd_logit", 1)
    logs = []
    kw = dict(preset="demo", rows=["w2a2_qat", "qkd_logit"], runs_dir=str(tmp_path / "runs"),
              out=str(tmp_path / "results"), overrides=sets, teacher=teacher, records=False, launcher=launcher,
              **({"cpus_per_run": 1} if launcher == "ray" else {"jobs": 2}))  # fmt: skip
    with pytest.raises(TableIncomplete, match="qkd_logit seed 1"):
        run_table(**kw, seeds=2, log=logs.append)
    table = (tmp_path / "results" / "table.md").read_text()
    assert "| w2a2_qat | W2A2 | 2 |" in table and "| qkd_logit | W2A2 | 1 |" in table and "qkd_logit seed 1" in table
    (failed / "failed.json").unlink()  # fixed: the next call trains that cell only
    logs.clear()
    run_table(**kw, seeds=2, log=logs.append)
    assert "| qkd_logit | W2A2 | 2 |" in (tmp_path / "results" / "table.md").read_text()


POOL_SCRIPT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from vaqkd.launch import worker_pool
spawn = multiprocessing.get_context("spawn")
pool = worker_pool(1) if sys.argv[1] == "vaqkd" else ProcessPoolExecutor(1, mp_context=spawn)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 60)  # the worker is busy, as with a training cell
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("pool", ["vaqkd", "plain"])
def test_workers_stop_when_the_table_process_is_killed(pool):
    """SIGKILL the process that owns the pool: vaqkd's workers stop within seconds; a plain pool's worker (the
    contrast, and what `vaqkd table --jobs` had) trains on as an orphan."""
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL_SCRIPT, pool], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    worker = int(proc.stdout.readline())
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    try:
        end = time.time() + (10 if pool == "vaqkd" else 3)
        while _alive(worker) and time.time() < end:
            time.sleep(0.1)
        assert _alive(worker) == (pool == "plain")
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_sigint_to_the_table_stops_its_queue_and_workers_promptly(shared_cifar_root, tiny_teacher, tmp_path):
    """Ctrl-C / SIGINT to `vaqkd table --jobs 2` itself (not its process group): the queued cells never start,
    the running ones stop with their last checkpoint, and it exits 130 at once with the command to rerun."""
    sets = [s for s in _sets(shared_cifar_root) if isinstance(s, str) and not s.startswith("optim.epochs")]
    sets += ["optim.epochs=400", "train.checkpoint_every_steps=2"]  # cells that would run for minutes
    # one row, three seeds: seeds 0 and 1 train, seed 2 waits in the queue (no cell reads the teacher, only the
    # table's teacher row does: fewer things that could end a cell before the interrupt)
    cmd = [sys.executable, "-m", "vaqkd", "table", "--preset", "demo", "--rows", "w2a2_qat", "--seeds", "3",
           "--jobs", "2", "--teacher", str(tiny_teacher), "--runs-dir", str(tmp_path / "runs"), "--out",
           str(tmp_path / "res"), "--data-root", str(shared_cifar_root),
           *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    # a shell's background job inherits SIGINT ignored: give the table the default disposition a terminal gives
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, preexec_fn=restore)
    lines: list[str] = []  # every line of stdout, read by one reader (no line lost in a second reader's buffer)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        end = time.time() + 180
        while sum("] train " in x for x in list(lines)) < 2 and proc.poll() is None and time.time() < end:
            time.sleep(0.1)  # the workers' "[row sN] train  RUN_DIR" lines
        while not list((tmp_path / "runs").glob("*/ckpt-*")) and proc.poll() is None and time.time() < end:
            time.sleep(0.1)
        before = len(lines)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    err = (tmp_path / "stderr.txt").read_text()
    log = "".join(lines) + "--- stderr ---\n" + err[-3000:]
    ran = [x for x in lines[:before] if "] train " in x]
    ended = [x for x in lines[:before] if "FAILED" in x or x.startswith(("done ", "failed "))]
    # the premise: two cells were training (none had ended) when the interrupt came
    assert len(ran) == 2 and not ended, log
    assert proc.returncode == 130 and took < 45, log
    assert "rerun `vaqkd table --preset demo" in err and "--resume" not in err, log
    assert not [x for x in lines[before:] if "] train " in x], log  # no queued cell started after the interrupt
    assert not list((tmp_path / "runs").glob("*s2-*")) and list((tmp_path / "runs").glob("*/ckpt-*")), log
