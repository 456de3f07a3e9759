"""The run directory: its files (config.toml, env.json, metrics.jsonl, final.json, checkpoints) read with
one-line errors and written atomically, the run lock, the machine a run trained on, and weights by spec (shipped,
a run directory or a file) with the model a run directory holds. Analysis, deploy and the runner read runs here.

Checkpoints are one atomic unit: a checkpoint is a directory `ckpt-<step>/` holding `model.safetensors`,
`objective.safetensors` (weights, each stamped with the step in its metadata) and `state.pt` (optimizer, counters,
metric accumulators; loads with `weights_only=True`). It is written under a temporary name, flushed to disk and
renamed in one step, and the previous checkpoint is deleted only after that: at every instant the run directory
holds at least one complete checkpoint, and a kill (even inside the save) never pairs weights of one step with
state of another.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vaqkd.config import Config, Override, load_config
from vaqkd.data.build import Data, build_data
from vaqkd.errors import RunFileError, RunLockedError, file_in_the_way, user_path
from vaqkd.models import create_model
from vaqkd.quant import quantize_student

FORMAT = "vaqkd-checkpoint-1"
PREFIX = "ckpt-"
RUN_FILES = ("config.toml", "env.json", "tensorboard", "metrics.jsonl", "final.json", "failed.json", ".lock")


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


def _fsync(path: Path) -> None:
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


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (a temporary one is never named ckpt-<digits>)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def foreign_entries(run_dir: Path) -> list[str]:
    """What a folder holds that no run writes (a run's files, its checkpoints and hidden temporaries aside): a
    fresh run is not started among them (an --out naming a dataset or a project folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir())
    ckpt = [n for n in names if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [n for n in names if n not in RUN_FILES and not n.startswith(".") and n not in ckpt]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def has_checkpoint(run_dir: Path) -> bool:
    return latest_checkpoint(run_dir) is not None


def holds_run(run_dir: Path) -> bool:
    """A run started here: it has a checkpoint or has finished (a fresh start is refused, a resume continues it)."""
    return has_checkpoint(run_dir) or (Path(run_dir) / "final.json").exists()


def run_weights(run_dir: Path) -> Path:
    """model.safetensors of a run's latest checkpoint (the final weights of a finished run)."""
    ck = latest_checkpoint(run_dir)
    if ck is None and not Path(run_dir).exists():
        raise RunFileError(f"{run_dir}: no such run directory")
    if ck is None:
        raise RunFileError(f"{run_dir}: not a run directory with weights (no {PREFIX}<step>/ checkpoint)")
    return ck / "model.safetensors"


def _save_module(module: nn.Module, path: Path, step: int) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "step": str(step)})


def _checkpoint_bytes(run_dir: Path, model: nn.Module, objective: nn.Module) -> int:
    """About what a checkpoint takes: the previous one's size, else the weights twice (optimizer momenta)."""
    prev = latest_checkpoint(run_dir)
    if prev is not None:
        return sum(f.stat().st_size for f in prev.iterdir())
    return 2 * sum(t.numel() * t.element_size() for m in (model, objective) for t in m.state_dict().values())


def save_checkpoint(run_dir: Path, model: nn.Module, objective: nn.Module, state: dict) -> Path:
    run_dir = Path(run_dir)
    step = int(state["step"])
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_module(model, tmp / "model.safetensors", step)
        _save_module(objective, tmp / "objective.safetensors", step)
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except BaseException as e:  # a full disk, a kill (Ctrl-C): the temporary goes, the previous checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        err = (
            write_failure(run_dir, e, _checkpoint_bytes(run_dir, model, objective))
            if isinstance(e, Exception)
            else None
        )
        if err is None:
            raise
        raise err from None
    if final.exists():  # the same step saved again: move the old copy aside first (rename, not delete)
        old = run_dir / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(run_dir)
    for p in checkpoints(run_dir):  # the new one is complete: the older ones can go
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(f".{PREFIX}*"):  # temporaries of killed saves
        shutil.rmtree(p, ignore_errors=True)
    return final


def read_safetensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, truncated or damaged file is a RunFileError."""
    path = Path(path)
    if not path.exists():
        raise RunFileError(f"{path}: file missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError, ... : the message is what the user needs
        raise RunFileError(f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0][:160]})") from None


def load_module(module: nn.Module, path: Path, device: str = "cpu", strict: bool = True) -> dict[str, str]:
    """Load weights into `module`; a file that belongs to another model is a RunFileError. Returns metadata."""
    tensors, meta = read_safetensors(path, device)
    _load_state(module, tensors, path, strict, "this model")
    return meta


def _load_state(module: nn.Module, state: dict, path: Path, strict: bool, what: str):
    """`module.load_state_dict`; weights of other shapes (another class count, another width) are a RunFileError
    naming the file and the first mismatch."""
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else str(e)).strip()
        raise RunFileError(f"{path}: does not fit {what} ({first[:200]})") from None


def load_checkpoint(run_dir: Path, model: nn.Module, objective: nn.Module, device: torch.device) -> dict:
    ck = latest_checkpoint(run_dir)
    if ck is None and not Path(run_dir).exists():
        raise RunFileError(f"{run_dir}: no such run directory")
    if ck is None:
        raise RunFileError(f"{run_dir}: no checkpoint to resume from")
    step = int(ck.name[len(PREFIX) :])
    for name, module in (("model.safetensors", model), ("objective.safetensors", objective)):
        meta = load_module(module, ck / name, str(device))
        if meta.get("step") != str(step):
            raise RunFileError(f"{ck / name}: stamped step {meta.get('step')!r}, expected {step} (foreign file)")
    path = ck / "state.pt"
    if not path.exists():
        raise RunFileError(f"{path}: file missing")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RunFileError(f"{path}: damaged or not a checkpoint state ({type(e).__name__})") from None
    held = state.get("step") if isinstance(state, dict) else None
    if held != step:
        raise RunFileError(f"{path}: holds step {held}, expected {step} (foreign file)")
    return state


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


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# the fingerprints of what the tiny step does not run (engine.arithmetic), by env.json key: (a short name for
# reports, what it names in a refused resume). Held by only some runs: compared on a resume and in reports where
# both records have one, never counted as missing (analysis.report.OPTIONAL_FIELDS)
PART_FINGERPRINTS = {"arithmetic_kernels": ("kernels", "its fused quantizer kernels"),
                     "arithmetic_residual": ("residual", "its integer residual stream"),
                     "arithmetic_quantizers": ("quantizers", "its non-LSQ quantizers")}  # fmt: skip
# final.json's machine fields and where env.json holds them
MACHINE_ENV_KEYS = {"device": "device_name", "cpu_capability": "cpu_capability", "precision": "precision",
                    "threads": "threads", "world_size": "world_size", "arithmetic": "arithmetic",
                    **{k: k for k in PART_FINGERPRINTS}}  # fmt: skip


# the host CPU's fields: no part of a GPU run's arithmetic (its kernels run on the GPU; the fingerprint says which),
# so a GPU part of a run holds NOT_APPLICABLE there and one GPU's runs pair whatever host threads they had
HOST_FIELDS = ("cpu_capability", "threads")
NOT_APPLICABLE = "n/a"


def run_machine(env: dict) -> dict:
    """The machine a run trained on, from its env.json: the start and every resume. A field that changed on a
    resume (a run resumed on another kind of machine) holds each value in order of first use joined by " + "
    (e.g. "Intel(R) Xeon(R) Processor + AMD EPYC"), so the run is of neither kind and pairs only with a run of
    the same sequence. A field env.json lacks (older records) is None; the host CPU's fields of a part that trained
    on a GPU are NOT_APPLICABLE."""
    out = {}
    for field, key in MACHINE_ENV_KEYS.items():
        seen = []
        for part in (env, *env.get("resumes", [])):
            gpu = str(part.get("device", "")).startswith("cuda")
            value = NOT_APPLICABLE if gpu and field in HOST_FIELDS else part.get(key)
            if value is not None and value not in seen:
                seen.append(value)
        out[field] = None if not seen else seen[0] if len(seen) == 1 else " + ".join(map(str, seen))
    return out


PRETRAINED = {"resnet32": "resnet32_cifar100"}  # what plain "pretrained" means, per architecture


def pretrained_names() -> list[str]:
    """The weights shipped in the package, by the name "pretrained:NAME" selects them with."""
    folder = resources.files("vaqkd") / "pretrained"
    return sorted(f.name.removesuffix(".safetensors") for f in folder.iterdir() if f.name.endswith(".safetensors"))


def resolve_weights(spec: str, arch: str, what: str = "") -> Path:
    """A weights spec -> a .safetensors path: 'pretrained' (the default shipped weights of `arch`),
    'pretrained:NAME' (src/vaqkd/pretrained/NAME.safetensors), a run directory, or a file. `what`: the setting
    that named it (e.g. distill.teacher), said in the error when the weights are not there."""
    if spec == "pretrained":
        if arch not in PRETRAINED:
            raise FileNotFoundError(f"no pretrained weights ship for {arch!r} (available: {sorted(PRETRAINED)})")
        spec = f"pretrained:{PRETRAINED[arch]}"
    if spec.startswith("pretrained:"):
        name = spec.removeprefix("pretrained:")
        if name not in pretrained_names():
            raise FileNotFoundError(f"{spec!r}: no such shipped weights (available: {pretrained_names()})")
        path = Path(str(resources.files("vaqkd") / "pretrained" / f"{name}.safetensors"))
    else:
        path = user_path(spec)
        if path.is_dir():
            path = run_weights(path)
    if not path.exists():
        raise FileNotFoundError(f"{what + ' ' if what else ''}{spec}: weights not found ({path})")
    return path


def load_weights(model: nn.Module, spec: str, arch: str, what: str = "") -> None:
    path = resolve_weights(spec, arch, what)
    state, _ = read_safetensors(path)
    missing, unexpected = _load_state(model, state, path, False, f"{arch} here")
    # a quantized run's file holds quantizer parameters too; an FP32 model simply ignores them
    unexpected = [k for k in unexpected if "_quant." not in k]
    if missing or unexpected:
        raise RunFileError(f"{path}: does not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def build_student(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model a config trains: created, initialised from `model.init`, quantized, on the device."""
    model = create_model(cfg.model.arch, num_classes)
    if cfg.model.init:
        load_weights(model, cfg.model.init, cfg.model.arch, "model.init")
    if cfg.quant.enabled:
        q = cfg.quant
        quantize_student(model, q.w_bits, q.a_bits, q.weight, q.act, q.per_channel, q.first_last, q.residual,
                         q.residual_bits)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def load_run(run_dir: str | Path, device: torch.device, overrides: Sequence[Override] = (),
             data_root: str | Path | None = None) -> tuple[Config, nn.Module, Data]:  # fmt: skip
    """Rebuild a run's model from its directory: (config, model with the latest weights, data).

    `overrides` change the run's config, `data_root` where its dataset is read from; the model is built without
    `model.init` (the run's own weights replace it)."""
    run = Path(run_dir)
    cfg = run_config(run, [*overrides, *([("data.root", str(data_root))] if data_root else [])])
    run_weights(run)  # a run without weights fails here, before the data is loaded
    data = build_data(cfg, device)
    return cfg, run_model(run, cfg, data.num_classes, device), data


def run_config(run: Path, overrides: Sequence[Override] = ()) -> Config:
    """A run directory's config (with `overrides` applied), built without `model.init`: its own weights replace
    it."""
    if not Path(run).exists():
        raise RunFileError(f"{run}: no such run directory (or file)")
    if not (run / "config.toml").exists():
        raise RunFileError(f"{run}: not a run directory (no config.toml)")
    return load_config(run / "config.toml", [*overrides, ("model.init", "")])


def run_model(run: Path, cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model of a run directory with its latest weights (quantized or not, as the run trained it)."""
    model = build_student(cfg, num_classes, device)
    load_module(model, run_weights(run), str(device))
    return model


