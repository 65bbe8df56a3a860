"""Shared CLI plumbing: library errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from emma.errors import EmmaError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_INPUT = 2  # bad input: the user can fix it

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_INPUT) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    err_console.print(f"error: {message.splitlines()[0] if message else 'failed'}", markup=False)
    return typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command: EmmaError / OSError / ValueError → one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except EmmaError as exc:
            raise fail(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise fail(f"{type(exc).__name__}: {exc}") from None

    return wrapper


ProgressUpdate = Callable[[str, int, "int | None"], None]


@contextmanager
def stderr_progress() -> Iterator[ProgressUpdate]:
    """Progress bars on stderr for a long command: ``update(description, done, total)`` (one row per
    description). Transient, off when stderr is not a terminal, started at the first update (so an error
    raised before any progress prints alone) and stopped on exit."""
    err = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    rows: dict[str, int] = {}

    def update(description: str, done: int, total: int | None) -> None:
        if not progress.live.is_started:
            progress.start()
        if description not in rows:
            rows[description] = progress.add_task(description, total=total)
        progress.update(rows[description], completed=done, total=total)

    try:
        yield update
    finally:
        if progress.live.is_started:
            progress.stop()
