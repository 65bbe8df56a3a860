"""Session-wide fixtures shared by every test package: tiny random-weight models of each family.

- ``tiny_model_dir("qwen2_5_vl")`` → the saved folder of a tiny model (built once, then reused from the
  on-disk cache of :mod:`emma.model.tiny_families`, also across pytest-xdist workers and runs).
- ``tiny_loaded("qwen2_5_vl")`` → a :class:`emma.model.registry.LoadedModel` on CPU (fp32), loaded once
  per session and shared: do not modify the model, processor or tokenizer you get (copy what you change).

Families: :data:`emma.model.tiny_families.TINY_FAMILIES`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from emma.model.registry import LoadedModel


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[[str], Path]:
    from emma.model.tiny_families import build_tiny

    def get(family: str) -> Path:
        return build_tiny(family)

    return get


@pytest.fixture(scope="session")
def tiny_loaded() -> Callable[[str], LoadedModel]:
    from emma.model.tiny_families import load_tiny

    loaded: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in loaded:
            loaded[family] = load_tiny(family)
        return loaded[family]

    return get


@pytest.fixture()
def loopback_http() -> Iterator[Callable[[type[BaseHTTPRequestHandler], Any], str]]:
    """Start scripted HTTP peers on 127.0.0.1 (free ports) for a test; yields ``start(handler, state)``.

    ``start`` returns the peer's ``/v1`` base URL; handlers reach ``state`` as ``self.server.state``.
    Every peer is shut down when the test ends.
    """
    running: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(handler: type[BaseHTTPRequestHandler], state: Any) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.state = state  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()
