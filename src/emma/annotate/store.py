"""The durable result store of annotation runs: teacher answers and "input done" markers, by key.

Layout::

    <store>/segments/<host>-<pid>-<start>-<token>.jsonl    one append-only file per writer (process)

Every process that writes opens a *new* segment of its own (lazily, at its first record) and only ever
appends whole lines to it: ``{"k": KEY, "t": TIME, "a": ANSWER}`` for a teacher answer,
``{"k": KEY, "t": TIME, "d": [OUTPUT IDS]}`` for an input whose outputs are all written. ``KEY`` is 32
hex digits (128 bits of a SHA-256, see :func:`result_key`), ``TIME`` the ISO-8601 UTC second the answer
was obtained (provenance reads it, so a resumed run writes the time of the original call).

Why segments and not SQLite. A run on one machine could use SQLite, but a Ray run has workers on
several nodes writing to one shared folder, and SQLite's locking is unreliable on NFS (its own
documentation warns against it). Per-writer append-only files need no locking at all: no two processes
ever write the same file, a reader never changes a file it did not write, and the only damage a crash
can do is a torn last line in the crashed writer's own segment. That line is recognised (no newline at
the end, or not a whole record) and ignored; the writer that follows opens a fresh segment, so a torn
line is never followed by more data. The first record of a key wins (later duplicates, which only
concurrent workers racing on one key can create, are ignored consistently by every reader).

Durability. Each record is one ``write`` of a whole line to an ``O_APPEND`` file descriptor (no
user-space buffer), so once :meth:`ResultStore.put_answer` returns the record survives a ``kill -9`` of
the process. Against a crash of the machine itself, ``fsync="always"`` fsyncs every record;
``"batch"`` (default) fsyncs at most every ``fsync_interval_s`` and at close (a power cut loses at most
that many seconds of answers, which are asked again); ``"never"`` leaves it to the OS.

Memory. Opening a store scans its segments once and keeps an index ``key → location`` of the records
*present at that moment* (about 100 bytes per record; the answers themselves stay on disk and are read
with ``pread`` when asked for). Records written by this process are appended but not indexed: within a
run every key is asked once (keys include the content hash of the item, which includes its id), so
the index never grows while a run streams, and a fresh run holds none at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from emma.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["FsyncPolicy", "Record", "ResultStore", "now_utc", "result_key"]

FsyncPolicy = Literal["always", "batch", "never"]

SEGMENTS = "segments"
_KEY_HEX = 32
_LINE_PREFIX = b'{"k":"'
_MAX_RECORD_BYTES = 16 * 1024 * 1024  # one answer: far above any teacher answer, bounds a corrupt file
_MAX_OPEN_SEGMENTS = 128
_READ_CHUNK = 1024 * 1024


def result_key(*parts: str) -> str:
    """The 128-bit key (32 hex digits) of a record: SHA-256 over the parts, each length-prefixed."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:_KEY_HEX]


def now_utc() -> str:
    """The current time as stored in records: ISO 8601, UTC, whole seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Record:
    """One stored record: a teacher answer (``answer``) or a done marker (``outputs``)."""

    key: str
    time: str
    answer: str | None = None
    outputs: list[str] | None = None


def _segment_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:48] or "host"
    return f"{host}-{os.getpid()}-{time.time_ns()}-{secrets.token_hex(3)}.jsonl"


def _check_key(key: str) -> bytes:
    if len(key) != _KEY_HEX or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not a result key: {key!r}")
    return bytes.fromhex(key)


class ResultStore:
    """Durable ``key → answer`` records in per-writer append-only JSONL segments (see the module doc).

    Thread-safe: one lock serialises this process's appends; reads use ``pread`` on shared descriptors.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "batch",
        fsync_interval_s: float = 1.0,
    ) -> None:
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be always, batch or never, got {fsync!r}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise DataFormatError(f"{self.root}: the result store must be a folder")
        self.segments_dir = self.root / SEGMENTS
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._segments: list[Path] = []
        self._index: dict[bytes, int] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()  # segment number → read descriptor
        self._own_fd: int | None = None
        self._own_path: Path | None = None
        self._last_sync = time.monotonic()
        self._dirty = False
        self._closed = False
        self.torn = 0  # incomplete or unreadable lines skipped while scanning
        self.written = 0  # records this process appended
        self._scan()

    # -- opening

    def _scan(self) -> None:
        for path in sorted(self.segments_dir.glob("*.jsonl")):
            number = len(self._segments)
            self._segments.append(path)
            self._scan_segment(number, path)
        if self.torn:
            log.warning("%s: skipped %d torn or unreadable record(s)", self.root, self.torn)

    def _scan_segment(self, number: int, path: Path) -> None:
        """Index every complete record of one segment; only keys are parsed here, answers on demand."""
        try:
            f = path.open("rb")
        except OSError as exc:
            raise DataFormatError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
        with f:
            offset = 0
            rest = b""
            while True:
                chunk = f.read(_READ_CHUNK)
                if not chunk:
                    break
                data = rest + chunk
                start = 0
                while True:
                    nl = data.find(b"\n", start)
                    if nl < 0:
                        break
                    self._index_line(number, offset + start, data[start : nl + 1])
                    start = nl + 1
                rest = data[start:]
                offset += start
                if len(rest) > _MAX_RECORD_BYTES:
                    raise DataFormatError(f"{path}: a record over {_MAX_RECORD_BYTES} bytes")
            if rest:  # no newline at the end: the torn last line of a killed writer
                self.torn += 1

    def _index_line(self, number: int, offset: int, line: bytes) -> None:
        if not (line.startswith(_LINE_PREFIX) and line.endswith(b"}\n")) or len(line) < 40:
            self.torn += 1 if line.strip() else 0
            return
        try:
            digest = bytes.fromhex(line[6 : 6 + _KEY_HEX].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            self.torn += 1
            return
        if digest not in self._index:
            self._index[digest] = (number << 64) | (offset << 24) | len(line)

    # -- reading

    def __len__(self) -> int:
        """Records indexed when the store was opened."""
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return _check_key(key) in self._index

    def get(self, key: str) -> Record | None:
        """The record stored under ``key`` when the store was opened, or None."""
        loc = self._index.get(_check_key(key))
        if loc is None:
            return None
        number, offset, length = loc >> 64, (loc >> 24) & ((1 << 40) - 1), loc & ((1 << 24) - 1)
        try:
            raw = os.pread(self._read_fd(number), length, offset)
            obj = json.loads(raw)
        except (OSError, ValueError) as exc:
            log.warning(
                "%s: unreadable record (%s); treating it as missing",
                self._segments[number],
                type(exc).__name__,
            )
            return None
        if not isinstance(obj, dict) or obj.get("k") != key or not isinstance(obj.get("t"), str):
            log.warning("%s: malformed record; treating it as missing", self._segments[number])
            return None
        answer, outputs = obj.get("a"), obj.get("d")
        if isinstance(answer, str):
            return Record(key, obj["t"], answer=answer)
        if isinstance(outputs, list) and all(isinstance(x, str) for x in outputs):
            return Record(key, obj["t"], outputs=outputs)
        log.warning("%s: malformed record; treating it as missing", self._segments[number])
        return None

    def _read_fd(self, number: int) -> int:
        with self._read_lock:
            fd = self._fds.get(number)
            if fd is not None:
                self._fds.move_to_end(number)
                return fd
            fd = os.open(self._segments[number], os.O_RDONLY)
            self._fds[number] = fd
            while len(self._fds) > _MAX_OPEN_SEGMENTS:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    # -- writing

    def put_answer(self, key: str, answer: str, time_: str | None = None) -> str:
        """Append a teacher answer; return the time stored with it."""
        t = time_ or now_utc()
        self._append({"k": key, "t": t, "a": answer})
        return t

    def put_done(self, key: str, outputs: Iterable[str], time_: str | None = None) -> None:
        """Append a done marker: every output (by id) of the input under ``key`` is written."""
        self._append({"k": key, "t": time_ or now_utc(), "d": list(outputs)})

    def _append(self, record: dict[str, Any]) -> None:
        _check_key(record["k"])
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        if len(line) > _MAX_RECORD_BYTES:
            raise DataFormatError(
                f"a record of {len(line)} bytes is over the store's limit of {_MAX_RECORD_BYTES}"
            )
        with self._lock:
            if self._closed:
                raise DataFormatError(f"{self.root}: the result store is closed")
            if self._own_fd is None:
                self._own_path = self.segments_dir / _segment_name()
                self._own_fd = os.open(
                    self._own_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644
                )
            view = memoryview(line)
            while view:
                n = os.write(self._own_fd, view)
                view = view[n:]
            self.written += 1
            self._dirty = True
            if self.fsync == "always" or (
                self.fsync == "batch" and time.monotonic() - self._last_sync >= self.fsync_interval_s
            ):
                self._sync()

    def _sync(self) -> None:
        if self._own_fd is not None and self._dirty:
            os.fsync(self._own_fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    def flush(self) -> None:
        """Fsync this process's segment now."""
        with self._lock:
            if self.fsync != "never":
                self._sync()

    def close(self) -> None:
        """Fsync and close this process's segment and every read descriptor."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._own_fd is not None:
                if self.fsync != "never":
                    self._sync()
                os.close(self._own_fd)
                self._own_fd = None
        with self._read_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
