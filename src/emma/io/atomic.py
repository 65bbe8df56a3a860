"""Atomic file replacement: the one home of "write a temporary file beside the target, then rename".

A reader sees the old file or the new one, never a mix, and a failed or killed writer leaves no partial
target. :func:`atomic_write` takes the bytes; :func:`atomic_path` yields a temporary path for writers
that want a file name (``ds.save_as``, ``image.save``, ``np.save``). Temporaries are named
``.<target>.<random>.tmp`` in the target's folder; :func:`remove_stale_temporaries` deletes those a
killed writer left. ``fsync=True`` also makes the result survive a machine crash (journals, manifests);
reports and exports that can be rebuilt skip it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "fsync_dir", "remove_stale_temporaries"]

_TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    """Fsync a folder so that renames and creations in it survive a machine crash (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(final.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) atomically; see the module doc for ``fsync``."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(blob)


def remove_stale_temporaries(folder: Path, name: str) -> int:
    """Delete the temporaries a killed writer left for ``folder/name``; how many."""
    n = 0
    for tmp in folder.glob(f".{name}.*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n
