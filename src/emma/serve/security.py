"""Server guards: API key, body-size bound, remote-URL policy, JSON errors and the audit log line.

:class:`GuardMiddleware` is a plain ASGI middleware (so streaming responses and disconnect detection
pass through untouched). For every HTTP request it

1. gives the request an id (``X-Request-ID`` response header) and an :class:`AuditRecord` that the
   handlers fill in (image count, token counts) through ``request.state.audit``;
2. checks ``Authorization: Bearer <key>`` for ``/v1/...`` paths when an API key is set (constant-time
   compare), before reading any of the body, and answers 401 JSON otherwise;
3. reads the body with a bound: a ``Content-Length`` over ``max_body_bytes`` is answered 413 at once;
   a chunked body is counted as it arrives and answered 413 as soon as it passes the bound; the body is
   then replayed to the application, and later ``receive`` calls (disconnect detection) pass through;
   with a :class:`~emma.serve.budget.MemoryBudget`, the request gets a
   :class:`~emma.serve.budget.Ledger` (``request.state.memory``) and its body is reserved in it before
   it is read (503 ``server_busy`` with ``Retry-After`` when the budget is in use); everything the
   request reserved is released when its response has ended;
4. turns an unexpected exception into a 500 JSON error that names no content;
5. writes exactly one line to the ``emma.audit`` logger: request id, method, a known route (never the
   raw path of an unknown one), status, images, bytes in and out, prompt and completion tokens, latency.
   No request or response content, no client address.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emma.serve.budget import BODY_COPIES, Ledger, MemoryBudget, OverBudget

AUDIT_LOGGER_NAME = "emma.audit"
audit_logger = logging.getLogger(AUDIT_LOGGER_NAME)
_log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/v1/"
DRAIN_FACTOR = 4  # a refused body is read and discarded up to this many times the bound ...
DRAIN_MIN_BYTES = 16 * 1024**2  # ... or at least this much ...
DRAIN_SECONDS = 10.0  # ... for at most this long
AUDITED_ROUTES = (
    "/v1/chat/completions",
    "/v1/models",
    "/v1/emma/preview",
    "/health",
    "/openapi.json",
    "/docs",
    "/",
)


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` with ``status``.

    ``message`` must never quote request content (no text, no image bytes, no header values).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers or None)


def error_payload(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


# ------------------------------------------------------------------------------------------ checks


def api_key_matches(authorization: str | None, expected: str) -> bool:
    """``Authorization: Bearer <expected>``, compared in constant time."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8"))


def normalise_domains(domains: Iterable[str]) -> tuple[str, ...]:
    """Lower-cased hosts without scheme, port, trailing dot or leading ``*.``/``.``."""
    out = []
    for d in domains:
        host = d.strip().lower()
        if "://" in host:
            host = host.split("://", 1)[1]
        host = host.split("/", 1)[0].rstrip(".")
        if host.startswith("["):  # [v6]:port
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        host = host.removeprefix("*.").lstrip(".")
        if host:
            out.append(host)
    return tuple(dict.fromkeys(out))


def host_allowed(host: str | None, allowed_domains: Iterable[str]) -> bool:
    """True when ``host`` is one of ``allowed_domains`` or a subdomain of one (``a.example.org`` is in
    ``example.org``); IP addresses must be listed exactly."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    for domain in normalise_domains(allowed_domains):
        if host == domain:
            return True
        if not _is_ip(domain) and host.endswith("." + domain):
            return True
    return False


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    h = host.strip().lower().strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- audit


@dataclass
class AuditRecord:
    """What the audit line reports about one request; handlers fill in the counts."""

    request_id: str
    method: str
    route: str
    status: int = 0
    images: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None  # an error code (never a message)
    start: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        latency_ms = (time.perf_counter() - self.start) * 1000.0
        fields = [
            f"request_id={self.request_id}",
            f"method={self.method}",
            f"route={self.route}",
            f"status={self.status}",
            f"images={self.images}",
            f"bytes_in={self.bytes_in}",
            f"bytes_out={self.bytes_out}",
            f"prompt_tokens={'-' if self.prompt_tokens is None else self.prompt_tokens}",
            f"completion_tokens={'-' if self.completion_tokens is None else self.completion_tokens}",
            f"latency_ms={latency_ms:.1f}",
        ]
        if self.error:
            fields.append(f"error={self.error}")
        return " ".join(fields)


def _route_label(path: str) -> str:
    if path in AUDITED_ROUTES:
        return path
    if path.startswith(PROTECTED_PREFIX):
        return "/v1/(other)"
    return "(static)"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> int:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})
    return len(data)


class _BodyTooLarge(Exception):
    def __init__(self, *, complete: bool) -> None:
        super().__init__("body too large")
        self.complete = complete  # the whole body has arrived (nothing left to drain)


class _ClientLeft(Exception):
    pass


class _BodyOverBudget(Exception):
    def __init__(self, error: OverBudget, *, complete: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.complete = complete


def over_budget_error(exc: OverBudget, retry_after_s: int, *, never_code: str) -> APIError:
    """413 (``never_code``) for what can never fit the budget, else 503 ``server_busy`` + Retry-After."""
    if exc.never:
        return APIError(413, str(exc), code=never_code)
    return APIError(
        503,
        str(exc),
        type="server_overloaded",
        code="server_busy",
        headers={"Retry-After": str(retry_after_s)},
    )


class GuardMiddleware:
    """See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        budget: MemoryBudget | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        record = AuditRecord(
            request_id=uuid.uuid4().hex, method=scope.get("method", "?"), route=_route_label(path)
        )
        scope.setdefault("state", {})["audit"] = record
        ledger = self.budget.ledger() if self.budget is not None else None
        scope["state"]["memory"] = ledger
        started = False
        api = path.startswith(PROTECTED_PREFIX)

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", record.request_id.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if api and not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                record.bytes_out += len(message.get("body", b""))
            await send(message)

        async def refuse(error: APIError, *, close: bool = False) -> None:
            record.error = error.code
            headers = dict(error.headers)
            if close:
                headers["Connection"] = "close"
            await _send_json(guarded_send, error.status, error.payload(), headers)

        try:
            needs_key = api and self.api_key is not None
            if needs_key and not api_key_matches(_header(scope, b"authorization"), self.api_key or ""):
                await refuse(
                    APIError(
                        401,
                        "missing or invalid API key: send 'Authorization: Bearer <key>'",
                        type="authentication_error",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                )
                return
            body = await self._admit_body(scope, receive, record, ledger, refuse)
            if body is None:
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, guarded_send)
        except Exception as exc:  # noqa: BLE001 — never a traceback with request data in it
            _log.error("request %s failed: %s", record.request_id, type(exc).__name__)
            record.error = "internal_error"
            if not started:
                await _send_json(
                    guarded_send,
                    500,
                    error_payload("internal server error", "server_error", "internal_error"),
                )
            else:
                record.status = 500
        finally:
            if ledger is not None and self.budget is not None:
                ledger.release()
                self.budget.trim_if_idle()
            audit_logger.info("%s", record.line())

    async def _admit_body(
        self,
        scope: Scope,
        receive: Receive,
        record: AuditRecord,
        ledger: Ledger | None,
        refuse: Callable[..., Awaitable[None]],
    ) -> bytes | None:
        """The whole body within ``max_body_bytes``, reserved in ``ledger`` before it is read (by its
        Content-Length, else chunk by chunk); None once the request has been refused (or its client
        left), what is left of a refused body drained."""
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await refuse(
                    APIError(400, "invalid Content-Length header", code="invalid_request"), close=True
                )
                return None
            if int(length) > self.max_body_bytes:
                await self._drain(receive, record)
                await refuse(self._too_large(), close=True)
                return None
            if ledger is not None and int(length) > 0:
                try:
                    ledger.reserve(int(length) * BODY_COPIES, "the request body")
                except OverBudget as exc:
                    await self._drain(receive, record)
                    await refuse(self._over_budget(exc), close=True)
                    return None
        try:
            return await self._read_body(receive, record, None if length is not None else ledger)
        except _BodyTooLarge as exc:
            if not exc.complete:
                await self._drain(receive, record)
            await refuse(self._too_large(), close=True)
        except _BodyOverBudget as exc:
            if not exc.complete:
                await self._drain(receive, record)
            await refuse(self._over_budget(exc.error), close=True)
        except _ClientLeft:
            record.status = 499
            record.error = "client_disconnected"
        return None

    def _over_budget(self, exc: OverBudget) -> APIError:
        return over_budget_error(exc, self.retry_after_s, never_code="body_too_large")

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"request body over the limit of {self.max_body_bytes} bytes",
            code="body_too_large",
        )

    async def _drain(self, receive: Receive, record: AuditRecord) -> None:
        """Read and discard the rest of a refused body (bounded in bytes and time), so the client gets
        to read the 413 instead of a connection reset; past the bounds the connection is just closed."""
        limit = max(DRAIN_MIN_BYTES, DRAIN_FACTOR * self.max_body_bytes)
        drained = 0
        with anyio.move_on_after(DRAIN_SECONDS):
            while drained <= limit:
                message = await receive()
                if message["type"] != "http.request":
                    return
                n = len(message.get("body", b""))
                drained += n
                record.bytes_in += n
                if not message.get("more_body", False):
                    return

    async def _read_body(self, receive: Receive, record: AuditRecord, ledger: Ledger | None) -> bytes:
        """The whole body within ``max_body_bytes``; with ``ledger`` (a body of unannounced length),
        each chunk is reserved as it arrives."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft()
            chunk = message.get("body", b"")
            record.bytes_in += len(chunk)
            if record.bytes_in > self.max_body_bytes:
                raise _BodyTooLarge(complete=not message.get("more_body", False))
            if ledger is not None and chunk:
                try:
                    ledger.reserve(len(chunk) * BODY_COPIES, "the request body")
                except OverBudget as exc:
                    raise _BodyOverBudget(exc, complete=not message.get("more_body", False)) from None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
