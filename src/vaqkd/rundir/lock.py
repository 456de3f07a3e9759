"""The run lock: one process trains a run directory at a time."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from vaqkd.errors import RunLockedError
from vaqkd.rundir.checkpoint import PREFIX, checkpoints


class RunLock:
    """An exclusive lock on a run directory (flock on `.lock`, released when the process ends, even by a kill).
    The lock file says who holds it: pid, host and start time. A start that fails (an exception) before the run
    holds anything — no checkpoint, metrics.jsonl, final.json or failed.json — takes back what a start writes
    there (`STARTED`, and the lock file) where the folder did not hold it before, and the folder if this lock made
    it (not its parents)."""

    STARTED = ("config.toml", "env.json", "tensorboard")  # what a start writes before its first checkpoint

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None
        self.created = False  # this lock made the directory
        self.before: set[str] = set()  # what it held before

    def __enter__(self) -> RunLock:
        run_dir = self.path.parent
        for _ in range(100):
            self.created |= not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                try:  # whether the lock file was there before: O_EXCL
                    fd, had_lock = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), False
                except FileExistsError:
                    fd, had_lock = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), True
            except FileNotFoundError:
                if run_dir.is_dir():  # not the folder vanishing: something in the way (a dangling link)
                    raise
                continue  # a failed start took its folder back between the mkdir and the open
            try:
                locked = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked:
                break
            os.close(fd)
        else:
            raise RunLockedError(f"{run_dir}: its lock file keeps being replaced by other processes; try again")
        try:  # what the folder held before this start, the lock file aside (read while held: no start is tidying)
            self.before = {p.name for p in run_dir.iterdir() if p.name != self.path.name or had_lock}
            info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode(), 0)
            except OSError:  # a full disk: the lock holds all the same, only the holder's name is not recorded
                pass
            # the one writer now: temporaries of saves that a kill or a full disk interrupted only take space
            for p in self.path.parent.glob(f".{PREFIX}*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _lock(self, fd: int) -> bool:
        """flock `fd` (RunLockedError, naming the holder, if another process has it); False if the file is no longer
        the folder's lock file (a failed start removed it meanwhile, see __exit__): the caller opens the new one."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            msg = f"{self.path.parent}: in use by {holder}; wait for it or choose another --out"
            raise RunLockedError(msg) from None
        try:
            now, mine = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def __exit__(self, exc_type, *exc) -> None:
        if self.fd is None:
            return
        tidied = exc_type is not None and self._tidy_failed_start()
        if tidied and self.path.name not in self.before:
            try:  # while held: a process that opened it meanwhile finds it replaced and opens the new one
                self.path.unlink()
            except OSError:
                pass
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if tidied and self.created:
            try:
                self.path.parent.rmdir()  # only if empty: another start may have begun in it meanwhile
            except OSError:
                pass

    def _tidy_failed_start(self) -> bool:
        """Remove what a start wrote (`STARTED`, not held before) if the run holds nothing yet; whether it did.
        Runs while the lock is held."""
        run_dir = self.path.parent
        try:  # tidying is a courtesy: the error that stopped the run is the one to report
            held = ("metrics.jsonl", "final.json", "failed.json")
            if any((run_dir / f).exists() for f in held) or checkpoints(run_dir):
                return False
            for name in self.STARTED:
                p = run_dir / name
                if name in self.before or not (p.exists() or p.is_symlink()):
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:
            return False
        return True
