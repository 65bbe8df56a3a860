"""The fuzz battery's shared parts (imported by its tests as ``fuzzing``): one seeded Hypothesis profile, a hard per-example time bound, and
resident-memory accounting.

Every fuzz test is derandomized (its examples follow from the test's name, so CI is reproducible), keeps
no example database, and runs its number of examples scaled by ``EMMA_FUZZ_SCALE`` (default 1: the
size that keeps the battery within a few minutes of ``make test``; e.g. ``EMMA_FUZZ_SCALE=20`` for a
deeper local run). ``EMMA_FUZZ_RANDOM=1`` explores other examples than CI's (Hypothesis prints the seed
and a reproduction blob of any failure; ``--hypothesis-seed=N`` replays a seed).

A hang is caught twice: Hypothesis' ``deadline`` fails an example that takes longer than
:data:`DEADLINE_S` (measured after the fact), and :func:`hard_deadline` interrupts one that never
returns (SIGALRM on the main thread) so that the test fails instead of blocking ``make test``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("EMMA_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("EMMA_FUZZ_RANDOM", "") not in ("", "0")
DEADLINE_S = 20.0  # one example: far above any legitimate input here (milliseconds to a second)
HANG_S = 60  # one example that has not returned after this long is a hang

T = TypeVar("T")


def fuzz_settings(examples: int) -> settings:
    """Settings of one fuzz test: ``examples`` examples (x ``EMMA_FUZZ_SCALE``), derandomized unless
    ``EMMA_FUZZ_RANDOM`` is set, no database."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        derandomize=not RANDOM,
        database=None,
        deadline=timedelta(seconds=DEADLINE_S),
        print_blob=True,
        # examples are deliberately slow-ish (files, HTTP requests) and filtered a little
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """``weight``-to-one choices between strategies (``st.one_of`` treats a strategy given twice as
    given once, so repeating one does not weigh it)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


class Hang(BaseException):
    """An example that did not return within :data:`HANG_S` (a BaseException so that library code
    catching ``Exception`` cannot swallow it)."""


@contextmanager
def hard_deadline(seconds: float = HANG_S) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds`` (no-op off the
    main thread, where Hypothesis' deadline still applies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"example still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, f"/proc/self/status has no {field}"
    return int(match.group(1))


class MemoryWatch:
    """Peak resident memory of this process over a block, against what it was at the start.

    The peak is the kernel's high-water mark (VmHWM), reset at the start (``/proc/self/clear_refs``),
    so it sees transient peaks inside a call, not only what is left after it."""

    def __init__(self) -> None:
        self.start_kib = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.peak_kib = self.start_kib

    def sample(self) -> None:
        self.peak_kib = max(self.peak_kib, _status_kib("VmHWM"))

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.start_kib) / 1024
