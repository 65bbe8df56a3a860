"""``emma serve`` (the real CLI) in a subprocess for tests: started, waited for, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def emma_serve(
    args: Sequence[str], port: int, log: Path, env: Mapping[str, str], timeout_s: float = 120
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``emma serve ARGS --port PORT`` (output to ``log``) until ``/health`` answers, fail if it exits
    or stays unready for ``timeout_s``; yield the process, then SIGTERM it and wait for its exit."""
    command = [sys.executable, "-c", "from emma.cli import app; app()", "serve", *args, "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(env))
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                assert proc.poll() is None, log.read_text()[-500:]
                assert time.monotonic() < deadline, f"emma serve not ready: {log.read_text()[-500:]}"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
