"""Crash-safe file primitives shared by every long job that writes (annotate, synth, eval, imports).

The write protocol of EMMA's resumable jobs (docs/annotation.md, "Exactly once under kill -9"):

- **One writer per output folder.** :func:`exclusive_folder` holds an exclusive ``flock`` on
  ``<folder>/.emma.lock`` for the whole run. The kernel drops the lock when the holder dies, however it
  dies (``kill -9`` included), so a lock is never stale; a second process started while the first
  still runs is refused with a one-line error naming the holder's pid instead of interleaving its
  writes with the first one's (two writers are how a store ends up with an id twice).
- **Append-only journals.** A record is one whole line appended by one ``write`` to an ``O_APPEND``
  descriptor (:func:`append_lines`). A kill can only leave the *last* line torn (no newline at the
  end); :func:`cut_torn_tail` removes it before anything is appended again, and readers ignore it. A
  key found twice keeps its first record.
- **Whole files are replaced atomically** (:mod:`emma.io.atomic`, re-exported here). :func:`atomic_write` writes a temporary file in the same
  folder, fsyncs it and ``os.replace``-s it over the target (then fsyncs the folder): a reader sees the
  old file or the new one, never a mix; a kill leaves at most a ``.<name>.*.tmp`` file, which nothing
  reads and :func:`remove_stale_temporaries` deletes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from emma.errors import InputError
from emma.io.atomic import atomic_write, fsync_dir, remove_stale_temporaries

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "FolderBusyError",
    "append_lines",
    "atomic_write",
    "cut_torn_tail",
    "exclusive_folder",
    "fsync_dir",
    "remove_stale_temporaries",
]

LOCK_FILE = ".emma.lock"


class FolderBusyError(InputError):
    """Another live process is writing the folder (it holds the folder's lock)."""


def cut_torn_tail(path: str | os.PathLike[str]) -> int:
    """Truncate ``path`` after its last newline (a kill may leave half a line); bytes dropped."""
    with Path(path).open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos, end = size, 0
        while pos > 0:
            step = min(64 * 1024, pos)
            f.seek(pos - step)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                break
            pos -= step
        if end < size:
            log.warning("%s: dropping a torn last line (%d bytes)", path, size - end)
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        return size - end


def append_lines(path: str | os.PathLike[str], lines: Iterable[str], *, fsync: bool = True) -> None:
    """Append whole lines (each without its newline) to ``path`` with one ``write`` on ``O_APPEND``.

    The caller must have cut a torn tail (:func:`cut_torn_tail`) since the file was last written by a
    process that may have been killed, so that the first new line never continues half of an old one.
    """
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "another process"
    return f"pid {text}" if text.isdigit() else "another process"


@contextmanager
def exclusive_folder(folder: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) while the block runs.

    Raises :class:`FolderBusyError` at once when another live process holds it. The lock dies with the
    process, so a killed run never blocks the next one.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FolderBusyError(
                f"{root} is being written by {_holder(lock_path)} (another {what}); wait for it to end or "
                "stop it, then rerun to resume"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        yield root
    finally:
        os.close(fd)  # releases the lock
