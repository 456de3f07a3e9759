"""The errors a user can cause and fix: the command line prints them as one line (no traceback unless
`--debug`); anything else is a bug and keeps its traceback."""

from __future__ import annotations

from pathlib import Path


class VaqkdError(Exception):
    """Base of the errors whose message alone tells the user what is wrong and where."""


class RunFileError(VaqkdError):
    """A file of a run directory (or a cache) is missing, truncated, damaged or belongs to another model."""


class RunLockedError(VaqkdError):
    """Another process is writing to this run directory."""


class TrainingDiverged(VaqkdError):
    """The loss became non-finite; the last good checkpoint is kept."""


class ConfigError(VaqkdError, ValueError):
    """A config key is unknown, of the wrong type, or out of range."""


class PathError(VaqkdError):
    """A path given cannot be used as one: an unknown `~user`, a symlink loop."""


def user_path(text: str | Path) -> Path:
    """`text` as a Path with `~` / `~user` expanded; an unknown user is a PathError naming the path."""
    path = Path(text)
    try:
        return path.expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory."
        raise PathError(f"{text}: {path.parts[0]} is no user's home directory") from None


def file_in_the_way(folder: str | Path) -> Path | None:
    """The nearest of `folder` and its parents that exists, when it is not a folder (a file where a folder is
    wanted); None when the folder exists or can be made."""
    path = Path(folder)
    nearest = next((q for q in (path, *path.parents) if q.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def resolved(path: str | Path) -> Path:
    """Path(path).resolve(); a symlink loop is a PathError naming the path."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # 3.11: RuntimeError("Symlink loop from ..."); later: OSError ELOOP
        raise PathError(f"{path}: cannot be resolved ({e})") from None
