"""The server's memory budget: what requests in flight may hold, reserved before it is allocated.

One :class:`MemoryBudget` per server (``ServeSettings.memory_budget_mb``). Each HTTP request gets a
:class:`Ledger` (made by :class:`~emma.serve.security.GuardMiddleware`, released when its response has
ended, however it ends) through which everything large is reserved before it exists:

- the body, ``BODY_COPIES`` times its length, before it is read (the bytes, the parsed JSON strings and
  a decoded image's bytes live together);
- each image's decoding, from its header (:func:`emma.io.plan.plan_images`: pixels x
  ``DECODE_BYTES_PER_PIXEL``), before any pixel is decoded; once decoded, that reservation shrinks to
  what the request keeps (the model-ready images, ``HELD_BYTES_PER_PIXEL`` per pixel: the RGB array,
  the PIL image the engine reads and the processor's float tensors).

A reservation that can never fit (more than the whole budget) is refused with 413; one that does not
fit beside the requests in flight with 503 and ``Retry-After`` (:class:`OverBudget`), so the server
refuses before allocating instead of growing without bound.

When the last request in flight ends after large reservations, :func:`release_free_memory` hands the
allocator's free pages back to the system (glibc keeps freed heap memory otherwise: the server's RSS
would stay at its peak). :func:`bound_allocator` (called by ``emma serve`` at start) makes glibc serve
every block of 1 MiB or more from its own mapping, unmapped when freed: without it, glibc raises that
threshold to 32 MiB after the first large free, and a decoded image's blocks stay in the heap of the
thread that decoded it, so freed memory accumulates across threads beyond what is reserved.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass, field
from typing import Any

from emma.errors import require_at_least

BODY_COPIES = 3  # request bytes + parsed JSON strings + one decoded image's bytes
HELD_BYTES_PER_PIXEL = 3 + 4 + 12  # RGB uint8 array + PIL RGB(X) image + float32 CHW tensor
TRIM_AFTER_BYTES = 64 * 1024**2  # reservations since the last trim that make one worth its few ms


MMAP_THRESHOLD_BYTES = 1024**2  # blocks this large or larger get their own mapping (see bound_allocator)
ARENAS = 2  # glibc heaps shared by the server's threads
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters


@functools.cache
def _libc_function(name: str) -> Any:
    """A glibc function, or None where the C library has none (musl, macOS); looked up on first use
    (in the symbols already loaded into the process: nothing is run or loaded at import)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None


def bound_allocator() -> bool:
    """Make freed large blocks go back to the system at once and share few heaps between threads
    (glibc's ``mallopt``); a process-wide setting, for the server process. False where unavailable."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_ARENA_MAX, ARENAS))


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc); False where that is not available."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


class OverBudget(Exception):
    """A reservation was refused: ``never`` when it exceeds the whole budget (the request can never be
    served here: 413), else the budget is in use by other requests (503, retry later)."""

    def __init__(self, needed: int, available: int, total: int, what: str) -> None:
        self.needed = needed
        self.available = available
        self.total = total
        self.never = needed > total
        mib = 1024**2
        if self.never:
            message = (
                f"{what} needs about {_ceil(needed, mib)} MiB of server memory, over this server's "
                f"memory budget of {total // mib} MiB"
            )
        else:
            message = f"the server's memory budget is in use by other requests ({what}); retry later"
        super().__init__(message)


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit)


class MemoryBudget:
    """A thread-safe count of reserved bytes against ``total_bytes``."""

    def __init__(self, total_bytes: int) -> None:
        require_at_least("total_bytes", total_bytes, 1)
        self.total = total_bytes
        self._used = 0
        self._peak = 0
        self._since_trim = 0  # bytes reserved since the allocator was last trimmed
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most ever reserved at once (for tests and benchmarks)."""
        return self._peak

    def ledger(self) -> Ledger:
        return Ledger(self)

    def _take(self, n: int, what: str) -> None:
        with self._lock:
            if n > self.total - self._used:
                raise OverBudget(n, self.total - self._used, self.total, what)
            self._used += n
            self._since_trim += n
            self._peak = max(self._peak, self._used)

    def _give(self, n: int) -> None:
        with self._lock:
            self._used = max(self._used - n, 0)

    def trim_if_idle(self) -> bool:
        """Release free heap memory to the system when nothing is reserved any more and enough was
        reserved since the last time (called as each request ends); True when it trimmed."""
        with self._lock:
            if self._used or self._since_trim < TRIM_AFTER_BYTES:
                return False
            self._since_trim = 0
        return release_free_memory()


@dataclass(eq=False)
class Reservation:
    """Bytes held by one reservation of a :class:`Ledger`."""

    nbytes: int


@dataclass(eq=False)
class Ledger:
    """One request's reservations; :meth:`release` gives all of them back (idempotent)."""

    budget: MemoryBudget
    reservations: list[Reservation] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def held(self) -> int:
        return sum(r.nbytes for r in self.reservations)

    def reserve(self, nbytes: int, what: str) -> Reservation:
        """Reserve ``nbytes`` (raises :class:`OverBudget`)."""
        n = max(0, int(nbytes))
        self.budget._take(n, what)
        reservation = Reservation(n)
        with self._lock:
            self.reservations.append(reservation)
        return reservation

    def shrink(self, reservation: Reservation, nbytes: int) -> None:
        """Lower ``reservation`` to ``nbytes`` (what is actually kept); never raises it."""
        with self._lock:
            n = max(0, min(int(nbytes), reservation.nbytes))
            freed = reservation.nbytes - n
            reservation.nbytes = n
        if freed:
            self.budget._give(freed)

    def release(self) -> None:
        with self._lock:
            total = sum(r.nbytes for r in self.reservations)
            self.reservations.clear()
        if total:
            self.budget._give(total)
