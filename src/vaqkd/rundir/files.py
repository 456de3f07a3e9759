"""Run files read with one-line errors naming the file and the key, and written atomically (a temporary name,
renamed over the file); a full or read-only disk is one line saying so."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from vaqkd.errors import RunFileError, file_in_the_way


class DiskFullError(RunFileError):
    """A write failed for lack of space (or quota); what was there before it is kept."""


_FULL = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")
_READ_ONLY = ("Read-only file system", "ReadOnlyFilesystem", "Permission denied", "PermissionDenied")


def write_failure(where: Path, e: BaseException, need_bytes: int = 0) -> Exception | None:
    """The one-line error for a failed write into `where` (None: not a failure the user can fix; re-raise it).
    safetensors and torch.save report a full disk or a read-only folder as their own exception types: their
    messages, and the free space (torch.save says only 'unexpected pos'), tell what happened."""
    text, code = str(e), getattr(e, "errno", None)
    read_only = code in (errno.EROFS, errno.EACCES, errno.EPERM) or any(m in text for m in _READ_ONLY)
    full = code in (errno.ENOSPC, errno.EDQUOT) or any(m in text for m in _FULL)
    if not (full or read_only or code):
        try:
            full = shutil.disk_usage(where if Path(where).exists() else Path(where).parent).free < need_bytes
        except OSError:
            pass
    if full:
        need = f" (needs ~{max(1, math.ceil(need_bytes / 2**20))} MB)" if need_bytes else ""
        return DiskFullError(f"disk full in {where}{need}; free some space and retry (--resume continues a run)")
    if read_only:
        said = next((m for m in _READ_ONLY if m in text), text.splitlines()[0][:120] if text else type(e).__name__)
        return RunFileError(f"{where}: not writable ({getattr(e, 'strerror', None) or said})")
    if isinstance(e, OSError):
        return RunFileError(f"{where}: cannot write ({e.strerror or e})")
    return None


def fsync(path: Path) -> None:
    """Flush a file or folder, by path, to disk (os.fsync takes a descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's file-creation mask (read, not changed, where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_file_target(path: Path, example: str = "model.vaqkd.safetensors", force: bool = True,
                      flag: str = "--out") -> None:  # fmt: skip
    """Refuse, in one line, a path that cannot become a regular file: a directory (`example`: the file name the
    error suggests in it), a device, pipe or socket (never replaced by a file), a path below a file; and, unless
    `force`, an existing file (`flag`: the option that named it)."""
    path = Path(path)
    if not force and path.is_file():
        raise RunFileError(f"{flag} {path}: exists; remove it, choose another {flag}, or pass --force")
    if path.is_dir():
        raise RunFileError(f"{path}: is a directory; give a file name (e.g. {path / example})")
    if path.exists() and not path.is_file():
        raise RunFileError(f"{path}: exists and is not a regular file (a device, a pipe); give a file path")
    if (parent := file_in_the_way(path.parent)) is not None:
        raise RunFileError(f"{path}: {parent} is a file, not a directory")


def atomic_write(path: Path, write: Callable[[Path], object], example: str = "model.vaqkd.safetensors") -> Path:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`: a reader (or a kill) never sees
    a half-written file, and an existing file is replaced whole or not at all. The file gets the usual mode (0666
    less the umask) whatever `write` made it (safetensors writes 0600). A path that cannot become a file is refused
    first (`check_file_target`, `example` a file name to suggest)."""
    path = Path(path)
    check_file_target(path, example)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:  # a file system without modes (some network or FUSE mounts): the file as written
            pass
        tmp.replace(path)
    except Exception as e:
        err = write_failure(path.parent, e)
        if err is None:
            raise
        raise err from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder refuses even the unlink of a file that is not there
            pass
    return path


NUMBER = (int, float)


def check_fields(where: str, obj: dict, require: dict[str, type | tuple]) -> None:
    """Each `require`d key present with a value of its type (int or float for `NUMBER`; never a bool): else a
    RunFileError naming `where` and the key."""
    for key, kind in require.items():
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "a number" if kind == NUMBER else getattr(kind, "__name__", str(kind))
            got = "missing" if key not in obj else f"{value!r}"
            raise RunFileError(f"{where}: damaged ({key!r} must be {what}, got {got})")


def read_json(path: Path, require: dict[str, type | tuple] | None = None) -> dict:
    """A run directory's JSON file (final.json, env.json, ...), with a one-line error naming a damaged one: not
    JSON, not an object, or without a `require`d key of its type (`check_fields`)."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path}: file missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: damaged (not JSON: {e})") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path}: damaged (a JSON {type(obj).__name__}, not an object)")
    check_fields(str(path), obj, require or {})
    return obj


def read_jsonl(path: Path, torn_tail_ok: bool = False, require: dict[str, type] | None = None) -> list[dict]:
    """The rows (JSON objects) of a JSON-lines file; a damaged line is a RunFileError naming it — not JSON, not an
    object, or without a `require`d key of its type — except (with `torn_tail_ok`) a last line that a kill or a full
    disk cut short (not JSON), which is dropped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: damaged (not UTF-8 text)") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if torn_tail_ok and i == len(lines):
                break
            raise RunFileError(f"{path}:{i}: damaged line (not JSON)") from None
        if not isinstance(row, dict):
            raise RunFileError(f"{path}:{i}: damaged line (a JSON {type(row).__name__}, not an object)")
        for key, kind in (require or {}).items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise RunFileError(f"{path}:{i}: damaged line ({key!r} missing or not {kind.__name__})")
        rows.append(row)
    return rows


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))
