"""Many runs at once: the cells of `vaqkd table` on worker processes of this machine (`--jobs N`) or as tasks
on a Ray cluster (`--launcher ray`). A cell is one (row, seed): `runner.row_result`, i.e. the same `fit` that
a single `vaqkd train` runs, in its own process, so a finished cell is reused and an interrupted one resumed
exactly as in the one-process table.

Ray is an optional extra (`pip install vaqkd[cluster]`), imported only by the Ray launcher.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from vaqkd.errors import ConfigError

Cell = tuple[str, int]


def run_cell(row: str, seed: int, task: tuple, threads: int | None = None) -> tuple[dict | None, dict]:
    """Train (or reuse) one cell in this process. `task` = (work, preset, teacher, overrides, runs, records):
    `work` is the runner's `row_result` (passed in, so the launcher does not import the runner that calls it).
    Returns (final.json or None if it failed, timing): the start and end time and the process id, so a caller
    can see which cells ran side by side."""
    import torch

    from vaqkd.engine.setup import tune_allocator

    tune_allocator()  # a worker is a fresh interpreter: the command line's setting did not reach it
    if threads:
        torch.set_num_threads(threads)
    row_result, preset, teacher, overrides, runs, records = task
    t0 = time.time()
    tag = f"[{row} s{seed}] "
    try:
        final = row_result(row, seed, preset, teacher, overrides, Path(runs), lambda s: print(tag + s, flush=True),
                           records=Path(records) if records else None)  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- one failed cell must not end the others; it is reported
        print(f"{tag}FAILED {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
        final = None
    return final, {"start": t0, "end": time.time(), "pid": os.getpid()}


def check_options(launcher: str, jobs: int, address: str | None, cpus_per_run: float | None,
                  gpus_per_run: float) -> None:  # fmt: skip
    """Options of the other launcher would be ignored: a ConfigError naming them (before any work)."""
    if launcher == "ray" and jobs != 1:
        raise ConfigError(f"--jobs {jobs}: counts the local launcher's processes; with --launcher ray, the "
                          "cluster's free CPUs/GPUs and --cpus-per-run / --gpus-per-run decide how many cells "
                          "run")  # fmt: skip
    ray_only = [o for o, v in (("--address", address), ("--cpus-per-run", cpus_per_run),
                               ("--gpus-per-run", gpus_per_run or None)) if v is not None]  # fmt: skip
    if launcher == "local" and ray_only:
        raise ConfigError(f"{' / '.join(ray_only)}: Ray's options; pass --launcher ray (the local launcher runs "
                          "--jobs processes here)")  # fmt: skip


def run_cells(cells: list[Cell], task: tuple, launcher: str, jobs: int, address: str | None,
              cpus_per_run: float | None, gpus_per_run: float, log: Callable[[str], None],
              ) -> Iterator[tuple[Cell, dict | None, dict]]:  # fmt: skip
    """Yield ((row, seed), final or None, timing) as cells finish."""
    if launcher == "local":
        yield from _local(cells, task, jobs, log)
    elif launcher == "ray":
        yield from _ray(cells, task, address, cpus_per_run, gpus_per_run, log)
    else:
        raise ValueError(f"launcher {launcher!r}: local or ray")


def _stop_with(parent: int, every: float = 1.0) -> None:
    """Pool initializer: a daemon thread that ends this worker (SIGTERM: its last checkpoint is kept) once the
    process that started it is gone. Without it a killed `vaqkd table` leaves its workers training on as
    orphans, holding their run locks, so a rerun reports those cells as in use."""

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        print(f"vaqkd worker {os.getpid()}: the table process {parent} is gone; stopping", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="vaqkd-parent-watch").start()


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """`jobs` spawned worker processes (fresh interpreters: no forked torch or thread state) that stop when
    this process ends, however it ends."""
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_stop_with, initargs=(os.getpid(),))


def _local(cells, task, jobs, log):
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"{len(cells)} cell(s) on {jobs} worker processes of this machine, {threads} thread(s) each")
    pool = worker_pool(jobs)
    try:
        futures = {pool.submit(run_cell, row, seed, task, threads): (row, seed) for row, seed in cells}
        for fut in as_completed(futures):
            final, t = fut.result()
            yield futures[fut], final, t
    except BaseException:  # Ctrl-C / SIGINT to this process, or the caller stopped: stop now, not after the queue
        stop_pool(pool)
        raise
    pool.shutdown()


def stop_pool(pool: ProcessPoolExecutor, grace: float = 30.0) -> None:
    """Cancel the queued cells and end the running ones with SIGTERM (each keeps its last checkpoint, so the
    same table command resumes it), waiting up to `grace` seconds before SIGKILL."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        p.terminate()
    end = time.time() + grace
    for p in workers:
        p.join(max(0.0, end - time.time()))
        if p.is_alive():
            p.kill()


def _ray(cells, task, address, cpus_per_run, gpus_per_run, log):
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray launcher needs ray: pip install 'vaqkd[cluster]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    cpus = cpus_per_run or 1
    threads = max(1, int(cpus))
    log(f"{len(cells)} cell(s) as Ray tasks ({cpus} CPU, {gpus_per_run} GPU each) on {ray.cluster_resources()}")
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus_per_run, max_retries=0)(run_cell)
    pending = {remote.remote(row, seed, task, threads): (row, seed) for row, seed in cells}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                final, t = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 -- a worker that died: the cell failed, the others go on
                log(f"[{cell[0]} s{cell[1]}] FAILED {type(e).__name__}: {str(e).splitlines()[0]}")
                final, t = None, {}
            yield cell, final, t
    finally:
        if started:
            ray.shutdown()
