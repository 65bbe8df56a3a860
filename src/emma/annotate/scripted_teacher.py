"""A scripted, deterministic OpenAI-compatible teacher server on 127.0.0.1 (tests, benchmarks, trying a pipeline).

``ScriptedTeacher(answer, latency_s=L, max_concurrent=K)`` serves ``POST /v1/chat/completions`` (not
streamed), ``GET /v1/models`` and ``GET /health`` on a free loopback port. It models a real teacher's
capacity: at most ``K`` requests are served at once, each holding its slot for ``L`` seconds, and
requests beyond ``K`` wait in line, so the server answers at most ``K / L`` requests per second. The
answer is ``answer(request)``: a pure function of the request (default :func:`echo_answer`, a hash of
the request text), so a run against it is deterministic whatever the concurrency.

Fault injection: ``faults(request)`` may name a fault for a request instead of an answer:

- ``"429"`` / ``"500"`` / ``"503"``: that HTTP status with an OpenAI-style error body;
- ``"stall"``: hold the request ``stall_s`` seconds (the client times out first), then answer;
- ``"drop"``: close the connection without an answer;
- ``"invalid_json"``: HTTP 200 with a body that is not JSON.

:func:`fail_first`, :func:`fail_every` and :func:`fail_when` build fault functions. Request ``index``
is the arrival order (0-based), so ``fail_first(3, "429")`` answers the first three requests with 429.

Nothing here listens beyond 127.0.0.1, and nothing is started at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

from emma.errors import require_at_least

__all__ = [
    "Fault",
    "ScriptedRequest",
    "ScriptedTeacher",
    "echo_answer",
    "fail_every",
    "fail_first",
    "fail_when",
]

Fault = Literal["429", "500", "503", "stall", "drop", "invalid_json"]
_FAULTS: frozenset[str] = frozenset({"429", "500", "503", "stall", "drop", "invalid_json"})
_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ScriptedRequest:
    """A chat request as the answer and fault functions see it."""

    index: int  # arrival order, 0-based
    model: str
    messages: list[dict[str, Any]]  # as received (OpenAI format; images as data URLs)
    text: str  # every text part of every message, joined with newlines
    n_images: int
    max_tokens: int | None
    temperature: float | None
    seed: int | None

    @property
    def last_user_text(self) -> str:
        """The text of the last user message (where the prompt of a step usually is)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return _text_of(m.get("content"))
        return ""


AnswerFn = Callable[[ScriptedRequest], str]
FaultFn = Callable[[ScriptedRequest], "Fault | None"]


def echo_answer(request: ScriptedRequest) -> str:
    """The default answer: a JSON object with a hash of the request text and the image count."""
    digest = hashlib.sha256(request.text.encode("utf-8")).hexdigest()[:16]
    return json.dumps({"echo": digest, "images": request.n_images})


def fail_first(n: int, fault: Fault) -> FaultFn:
    """``fault`` for the first ``n`` requests, then none."""
    _check_fault(fault)
    return lambda r: fault if r.index < n else None


def fail_every(k: int, fault: Fault, *, offset: int = 0) -> FaultFn:
    """``fault`` for every ``k``-th request (indices ``offset``, ``offset + k``, ...)."""
    _check_fault(fault)
    require_at_least("k", k, 1)
    return lambda r: fault if r.index >= offset and (r.index - offset) % k == 0 else None


def fail_when(predicate: Callable[[ScriptedRequest], bool], fault: Fault) -> FaultFn:
    """``fault`` for every request ``predicate`` holds for (e.g. a marker in the prompt)."""
    _check_fault(fault)
    return lambda r: fault if predicate(r) else None


def _check_fault(fault: str) -> None:
    if fault not in _FAULTS:
        raise ValueError(f"unknown fault {fault!r} ({', '.join(sorted(_FAULTS))})")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _count_images(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
    return n


@dataclass
class ScriptedStats:
    requests: int = 0  # chat requests received
    answered: int = 0  # answered with a completion
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0  # requests holding a slot now
    max_in_flight: int = 0
    waiting: int = 0  # requests waiting for a slot now
    max_waiting: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: a burst of new connections must not be dropped
    teacher: ScriptedTeacher

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (timed out, dropped) is normal here: no traceback on stderr."""
        return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": "loopback", "code": status}}, headers)

    def do_GET(self) -> None:
        t = self.server.teacher
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._send_json(
                200, {"object": "list", "data": [{"id": t.model, "object": "model", "owned_by": "emma"}]}
            )
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, "not found")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, "request body missing or too large")
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
            messages = body["messages"]
            if not isinstance(messages, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._error(400, "invalid chat request")
            return
        if body.get("stream"):
            self._error(400, "streaming is not supported by the scripted teacher")
            return
        self.server.teacher._serve(self, body, messages)


class ScriptedTeacher:
    """The scripted teacher server (see the module doc). Use as a context manager or start()/stop()."""

    def __init__(
        self,
        answer: AnswerFn | None = None,
        *,
        latency_s: float = 0.0,
        max_concurrent: int | None = None,
        faults: FaultFn | None = None,
        stall_s: float = 30.0,
        model: str = "loopback",
        port: int = 0,
    ) -> None:
        if latency_s < 0 or stall_s < 0:
            raise ValueError("latency_s and stall_s must be >= 0")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.answer = answer or echo_answer
        self.latency_s = latency_s
        self.max_concurrent = max_concurrent
        self.faults = faults
        self.stall_s = stall_s
        self.model = model
        self._port = port
        self._slots = threading.Semaphore(max_concurrent) if max_concurrent else None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._next_index = 0
        self.stats = ScriptedStats()

    # -- lifecycle

    def start(self) -> ScriptedTeacher:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.teacher = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="emma-scripted-teacher",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the scripted teacher is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The OpenAI base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def spec(self) -> str:
        """The model spec of this teacher: ``openai:URL#MODEL``."""
        return f"openai:{self.url}#{self.model}"

    @property
    def capacity(self) -> float | None:
        """Requests per second it can answer (``K / L``), None when unbounded."""
        if self.max_concurrent is None or self.latency_s == 0:
            return None
        return self.max_concurrent / self.latency_s

    # -- serving

    def _serve(self, handler: _Handler, body: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        with self._lock:
            index = self._next_index
            self._next_index += 1
            self.stats.requests += 1
        request = ScriptedRequest(
            index=index,
            model=str(body.get("model", "")),
            messages=messages,
            text="\n".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict)),
            n_images=_count_images([m for m in messages if isinstance(m, dict)]),
            max_tokens=body.get("max_tokens"),
            temperature=body.get("temperature"),
            seed=body.get("seed"),
        )
        fault = self.faults(request) if self.faults is not None else None
        if fault is not None:
            _check_fault(fault)
            with self._lock:
                self.stats.faults[fault] += 1
            self._fault(handler, fault)
            if fault != "stall":
                return
        self._wait_for_slot()
        try:
            if self.latency_s:
                self._stopping.wait(self.latency_s)
            text = self.answer(request)
        finally:
            self._release_slot()
        words = len(request.text.split())
        handler._send_json(
            200,
            {
                "id": f"chatcmpl-loopback-{index}",
                "object": "chat.completion",
                "created": 0,
                "model": self.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": words,
                    "completion_tokens": len(text.split()),
                    "total_tokens": words + len(text.split()),
                },
            },
        )
        with self._lock:
            self.stats.answered += 1

    def _wait_for_slot(self) -> None:
        if self._slots is None:
            with self._lock:
                self.stats.in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            return
        with self._lock:
            self.stats.waiting += 1
            self.stats.max_waiting = max(self.stats.max_waiting, self.stats.waiting)
        self._slots.acquire()
        with self._lock:
            self.stats.waiting -= 1
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)

    def _release_slot(self) -> None:
        with self._lock:
            self.stats.in_flight -= 1
        if self._slots is not None:
            self._slots.release()

    def _fault(self, handler: _Handler, fault: str) -> None:
        if fault in ("429", "500", "503"):
            headers = {"Retry-After": "0"} if fault == "429" else None
            handler._error(int(fault), f"loopback fault {fault}", headers)
        elif fault == "stall":
            self._stopping.wait(self.stall_s)
        elif fault == "drop":
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        elif fault == "invalid_json":
            body = b'{"choices": [ this is not json'
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    """``python -m emma.annotate.scripted_teacher``: serve the echo teacher until interrupted (prints its spec)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="a scripted OpenAI-compatible teacher on 127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request holds its slot")
    parser.add_argument("--max-concurrent", type=int, default=None, help="slots (K); more requests wait")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--model", default="loopback")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ScriptedTeacher(
        latency_s=args.latency, max_concurrent=args.max_concurrent, port=args.port, model=args.model
    ) as lb:
        print(lb.spec, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        print(
            json.dumps({"requests": lb.stats.requests, "max_in_flight": lb.stats.max_in_flight}), flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
