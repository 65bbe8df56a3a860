"""Why a path given by the user cannot be used, in one line: the one home of that message."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from emma.errors import InputError

__all__ = ["check_path"]


def check_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path when it names something that exists (a symbolic link is followed), else an
    InputError that says why not: missing, a broken symbolic link, a symbolic link loop, or the system's
    reason (permission denied, ...)."""
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise InputError(f"{p}: broken symbolic link (its target does not exist)") from None
        raise InputError(f"{p}: no such file or folder") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{p}: symbolic link loop (the link leads back to itself)") from None
        raise InputError(f"{p}: {exc.strerror or type(exc).__name__}") from None
    return p
