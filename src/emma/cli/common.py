"""Shared CLI plumbing: library errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

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


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    No partially written output file is ever left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
