"""How a command (or a benchmark's or script's entry point) ends on an error: one the user can fix is one line and
exit 2 (3 for a diverged training), anything else keeps its traceback."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

EXIT_USER, EXIT_DIVERGED = 2, 3
USER_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
                  errno.ENAMETOOLONG}  # fmt: skip


def user_error_line(e: BaseException) -> str | None:
    """The one line an error the user can fix is shown as (a VaqkdError, a file missing or in the way, the file
    system refusing: read-only, no permission, full, a directory where a file goes); None for anything else, a bug
    that keeps its traceback."""
    from vaqkd.errors import VaqkdError

    if isinstance(e, FileExistsError) and e.filename and Path(e.filename).is_file():  # mkdir over a file
        return f"{e.filename}: is a file, not a directory (a folder was needed there)"
    if isinstance(e, FileExistsError) and e.filename and Path(e.filename).is_symlink():  # leads nowhere
        return f"{e.filename}: a symlink that leads to no folder (dangling, or a loop); a folder was needed there"
    if isinstance(e, (VaqkdError, FileNotFoundError, FileExistsError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in USER_OS_ERRNOS:
        return f"{e.filename}: {e.strerror or e}" if e.filename else f"{e.strerror or e}"
    return None


def run_script(main_fn, prog: str) -> int:
    """A benchmark's or script's entry point under the command line's rule: an error the user can fix
    (`user_error_line`) is one line `PROG: error: ...` and exit 2, anything else keeps its traceback (and
    VAQKD_DEBUG=1 keeps every traceback). Returns main_fn()'s exit code (0 for None)."""
    import os

    try:
        code = main_fn()
        return code if isinstance(code, int) else 0
    except Exception as e:
        line = None if os.environ.get("VAQKD_DEBUG") == "1" else user_error_line(e)
        if line is None:
            raise
        from vaqkd.errors import TrainingDiverged

        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_USER
