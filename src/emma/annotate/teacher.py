"""The annotation teacher: one model behind the Engine interface, with retries and a circuit breaker.

``load_teacher(spec)`` builds a :class:`Teacher` from any model spec: ``openai:URL#MODEL`` (vLLM
serving a large VLM, ``emma serve``, any OpenAI-compatible server) or an in-process model
(``emma-tiny``, a local folder, a hub id). ``Teacher.ask(messages)`` makes one call and returns the
answer text, or raises :class:`TeacherError` with a short reason code.

Retries. One layer only: the :class:`~emma.infer.openai_engine.OpenAIEngine` is built with
``max_retries=0`` (the openai client does not retry) and the teacher retries every retryable failure
(HTTP 429, 408, 409 and 5xx, timeouts, dropped or refused connections, an unparseable server answer,
an in-process engine failure) with exponential backoff and full jitter: before retry ``n`` (0-based) it
sleeps ``uniform(0, min(max_s, base_s * 2**n))``. Unusable input (other 4xx answers, a prompt over the
token bound) is not retried. ``Retry-After`` headers are not visible through the Engine interface; the
backoff cap (30 s by default) stands in for them.

Circuit breaker. Every failed attempt that is retryable counts; ``failures`` of them in a row (no
success in between, across all threads) open the circuit: every call then fails at once with reason
``"circuit_open"`` (the runner rejects those items) for ``cooldown_s`` seconds. After the cool-down the
circuit is half-open: exactly one call is let through as a probe while the others keep failing fast; a
success closes the circuit, a failure opens it again for another cool-down. A call waiting in its
backoff when the circuit opens gives up at its next attempt.

Concurrency. ``ask`` is thread-safe and blocks its caller. Remote teachers keep at most
``concurrency`` HTTP requests in flight (the engine's semaphore). In-process teachers batch: a single
engine thread takes every call queued while the previous batch ran (up to ``concurrency``) and hands
them to ``engine.generate`` at once, so ``concurrency`` is the engine batch and the model is only ever
used from one thread.

Errors and logs never carry request or answer text: a :class:`TeacherError` says the reason, the HTTP
status when there is one, and the number of attempts.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from emma.errors import EmmaError, require_at_least
from emma.infer.engine import Engine
from emma.infer.types import GenerationRequest, GenerationResponse, Message, SamplingParams

log = logging.getLogger(__name__)

__all__ = [
    "CircuitBreaker",
    "CircuitPolicy",
    "RetryPolicy",
    "Teacher",
    "TeacherError",
    "TeacherReason",
    "classify_failure",
    "load_teacher",
    "teacher_name",
]

TeacherReason = Literal[
    "timeout", "rate_limited", "server_error", "connection", "circuit_open", "input", "engine"
]
RETRYABLE: frozenset[str] = frozenset({"timeout", "rate_limited", "server_error", "connection", "engine"})

_HTTP_STATUS_RE = re.compile(r"\bHTTP (\d{3})\b")
_OPENAI_PREFIX = "openai:"


class TeacherError(EmmaError):
    """A teacher call that failed: after its retries, at once for unusable input, or with the circuit open.

    ``reason`` is a short code (``timeout``, ``rate_limited``, ``server_error``, ``connection``,
    ``circuit_open``, ``input``, ``engine``); ``attempts`` how many requests were made; ``status`` the
    last HTTP status, when the teacher is a server that answered one. The message carries no request or
    answer text.
    """

    def __init__(self, reason: str, message: str, *, attempts: int = 0, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.attempts = attempts
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: retry ``n`` waits ``uniform(0, min(max_s, base_s * 2**n))``."""

    max_retries: int = 4
    base_s: float = 0.5
    max_s: float = 30.0

    def __post_init__(self) -> None:
        require_at_least("max_retries", self.max_retries, 0)
        if self.base_s < 0 or self.max_s < 0:
            raise ValueError("backoff times must be >= 0")

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_s, self.base_s * (2.0**retry)))


@dataclass(frozen=True)
class CircuitPolicy:
    """Open after ``failures`` retryable failed attempts in a row; probe again after ``cooldown_s``."""

    failures: int = 20
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        require_at_least("failures", self.failures, 1)
        require_at_least("cooldown_s", self.cooldown_s, 0)


class CircuitBreaker:
    """Closed → open (after consecutive failures) → half-open (one probe after the cool-down) → closed.

    Thread-safe. :meth:`acquire` says whether an attempt may go ahead (and marks the half-open probe as
    taken); :meth:`success` and :meth:`failure` report its outcome.
    """

    def __init__(self, policy: CircuitPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_out = False
        self.opened = 0  # times the circuit opened

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        with self._lock:
            return self._state()

    def _state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.policy.cooldown_s:
            return "half_open"
        return "open"

    def acquire(self) -> bool:
        with self._lock:
            state = self._state()
            if state == "closed":
                return True
            if state == "half_open" and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.info("teacher circuit closed")
            self._consecutive = 0
            self._opened_at = None
            self._probe_out = False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._opened_at is not None:  # the half-open probe failed: open again
                self._opened_at = self._clock()
                self._probe_out = False
                log.warning(
                    "teacher circuit re-opened (probe failed); retrying in %.0f s", self.policy.cooldown_s
                )
            elif self._consecutive >= self.policy.failures:
                self._opened_at = self._clock()
                self._probe_out = False
                self.opened += 1
                log.warning(
                    "teacher circuit opened after %d failed attempts in a row; calls fail fast for %.0f s",
                    self._consecutive,
                    self.policy.cooldown_s,
                )

    def release_probe(self) -> None:
        """A probe that ended without a verdict (unusable input): let another call probe."""
        with self._lock:
            self._probe_out = False


def classify_failure(response: GenerationResponse) -> tuple[str, int | None]:
    """``(reason, http_status)`` of a failed response (``finish_reason`` "error" or "cancelled").

    Engines that classify their failures set ``error_kind``; the OpenAI engine's error line names the
    HTTP status or the transport failure (see :func:`emma.infer.openai_engine.error_message`).
    """
    if response.error_kind in ("input", "prompt_too_long"):
        return "input", None
    error = response.error or ""
    m = _HTTP_STATUS_RE.search(error)
    if m:
        status = int(m.group(1))
        if status == 429:
            return "rate_limited", status
        if status == 408:
            return "timeout", status
        if status == 409 or status >= 500:
            return "server_error", status
        if 400 <= status < 500:
            return "input", status
        return "server_error", status
    lowered = error.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout", None
    if "cannot connect" in lowered or "connection" in lowered:
        return "connection", None
    return "engine", None


def teacher_name(spec: str) -> str:
    """The teacher's identity in result keys and provenance.

    For ``openai:URL#MODEL`` it is ``openai:MODEL``: the served model, not where it is served (a vLLM
    server moved to another node keeps its cached answers). Any other spec is its own identity.
    """
    s = spec.strip()
    if s.lower().startswith(_OPENAI_PREFIX) and "#" in s:
        return _OPENAI_PREFIX + s.rsplit("#", 1)[1]
    return s


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[GenerationResponse] = field(default_factory=Future)


class _EngineBatcher:
    """One engine thread for an in-process engine: every queued call (up to ``batch``) in one generate."""

    def __init__(self, engine: Engine, batch: int) -> None:
        self._engine = engine
        self._batch = batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, request: GenerationRequest) -> GenerationResponse:
        pending = _Pending(request)
        with self._lock:
            if self._closed:
                raise TeacherError("engine", "the teacher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="emma-teacher-engine", daemon=True)
                self._thread.start()
            self._queue.put(pending)
        return pending.future.result()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                responses = self._engine.generate([p.request for p in batch])
                for p, r in zip(batch, responses, strict=True):
                    p.future.set_result(r)
            except Exception as exc:  # noqa: BLE001 — the engine broke: fail this batch, keep serving
                for p in batch:
                    p.future.set_result(
                        GenerationResponse(
                            p.request.request_id, "", "error", error=type(exc).__name__, error_kind="engine"
                        )
                    )
            if stop:
                return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join()


class Teacher:
    """A teacher model: ``ask(messages) -> str`` with retries, backoff and a circuit breaker.

    ``spec`` is the model spec it was built from, ``name`` its identity in result keys and provenance
    (:func:`teacher_name`), ``family`` its model family (box conventions) or None when unknown.
    Use as a context manager, or call :meth:`close`, to stop its engine thread and HTTP client.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        spec: str,
        name: str | None = None,
        family: str | None = None,
        concurrency: int = 8,
        in_process: bool | None = None,
        sampling: SamplingParams | None = None,
        retry: RetryPolicy | None = None,
        circuit: CircuitPolicy | None = None,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require_at_least("concurrency", concurrency, 1)
        self.engine = engine
        self.spec = spec
        self.name = name or teacher_name(spec)
        self.family = family if family is not None else engine.family
        self.concurrency = concurrency
        self.sampling = sampling or SamplingParams(max_new_tokens=512, temperature=0.0)
        self.retry = retry or RetryPolicy()
        self.breaker = CircuitBreaker(circuit or CircuitPolicy(), clock=clock)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        if in_process is None:
            in_process = engine.capabilities.in_process
        self.in_process = in_process
        self._batcher = _EngineBatcher(engine, concurrency) if in_process else None
        self._stats_lock = threading.Lock()
        self._calls = 0
        self._attempts = 0
        self._failed: Counter[str] = Counter()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self.engine.close()

    def __repr__(self) -> str:
        return f"Teacher(name={self.name!r}, family={self.family!r}, concurrency={self.concurrency})"

    def stats(self) -> dict[str, Any]:
        """Calls, attempts (requests made), retries, failed calls by reason, times the circuit opened."""
        with self._stats_lock:
            return {
                "calls": self._calls,
                "attempts": self._attempts,
                "retries": self._attempts - self._calls if self._attempts > self._calls else 0,
                "failed": dict(sorted(self._failed.items())),
                "circuit_opened": self.breaker.opened,
            }

    def _count(self, *, call: bool = False, attempt: bool = False, failed: str | None = None) -> None:
        with self._stats_lock:
            self._calls += call
            self._attempts += attempt
            if failed is not None:
                self._failed[failed] += 1

    def _generate(self, request: GenerationRequest) -> GenerationResponse:
        if self._batcher is not None:
            return self._batcher.submit(request)
        return self.engine.generate([request])[0]

    def _backoff(self, retry: int) -> float:
        with self._rng_lock:
            return self.retry.delay(retry, self._rng)

    def ask(self, messages: Sequence[Message], *, sampling: SamplingParams | None = None) -> str:
        """One teacher call: the answer text (``finish_reason`` "length" included: the caller checks it).

        Raises :class:`TeacherError`: reason ``circuit_open`` at once while the circuit is open,
        ``input`` at once for unusable input, otherwise the last failure's reason after the retries.
        """
        self._count(call=True)
        params = sampling or self.sampling
        retries = self.retry.max_retries
        last_reason, last_status, attempts = "engine", None, 0
        for attempt in range(retries + 1):
            if not self.breaker.acquire():
                self._count(failed="circuit_open")
                raise TeacherError(
                    "circuit_open",
                    f"teacher circuit open (after {attempts} attempts of this call)",
                    attempts=attempts,
                    status=last_status,
                )
            attempts += 1
            self._count(attempt=True)
            request = GenerationRequest(messages=list(messages), sampling=params)
            try:
                response = self._generate(request)
            except BaseException:
                self.breaker.release_probe()  # no verdict: a half-open probe must not stay taken
                raise
            if response.finish_reason in ("stop", "length"):
                self.breaker.success()
                return response.text
            last_reason, last_status = classify_failure(response)
            if last_reason == "input":
                self.breaker.release_probe()
                self._count(failed="input")
                status = f" (HTTP {last_status})" if last_status else ""
                raise TeacherError(
                    "input",
                    f"the teacher refused the request as unusable{status}",
                    attempts=attempts,
                    status=last_status,
                )
            self.breaker.failure()
            if attempt < retries:
                delay = self._backoff(attempt)
                log.debug("teacher attempt %d failed (%s); retrying in %.2f s", attempts, last_reason, delay)
                self._sleep(delay)
        self._count(failed=last_reason)
        status = f" (last HTTP {last_status})" if last_status else ""
        raise TeacherError(
            last_reason,
            f"teacher call failed: {last_reason}{status} after {attempts} attempts",
            attempts=attempts,
            status=last_status,
        )


_IN_PROCESS_KEYS = ("device", "dtype", "quantization", "allow_download", "max_prompt_tokens")


def load_teacher(
    spec: str,
    *,
    concurrency: int = 8,
    timeout: float = 120.0,
    api_key: str | None = None,
    family: str | None = None,
    name: str | None = None,
    sampling: SamplingParams | None = None,
    retry: RetryPolicy | None = None,
    circuit: CircuitPolicy | None = None,
    seed: int | None = None,
    **engine_options: Any,
) -> Teacher:
    """A :class:`Teacher` for ``spec``.

    ``openai:URL#MODEL``: an OpenAIEngine with ``concurrency`` requests in flight, ``timeout`` seconds per
    request and no client-side retries (the teacher retries); ``family`` names the served model's family
    for box conventions. Any other spec is loaded in-process (``device``, ``dtype``, ``quantization``,
    ``allow_download``, ``max_prompt_tokens`` pass through) and batches up to ``concurrency`` calls.
    """
    from emma.infer.factory import load_engine

    if spec.strip().lower().startswith(_OPENAI_PREFIX):
        if engine_options:
            raise ValueError(f"options not used by an openai: teacher: {', '.join(sorted(engine_options))}")
        engine = load_engine(
            spec, api_key=api_key, concurrency=concurrency, max_retries=0, timeout=timeout, family=family
        )
        in_process = False
    else:
        unknown = sorted(set(engine_options) - set(_IN_PROCESS_KEYS))
        if unknown:
            raise ValueError(f"options not used by an in-process teacher: {', '.join(unknown)}")
        engine = load_engine(spec, max_batch_size=concurrency, **engine_options)
        in_process = True
    return Teacher(
        engine,
        spec=spec,
        name=name,
        family=family,
        concurrency=concurrency,
        in_process=in_process,
        sampling=sampling,
        retry=retry,
        circuit=circuit,
        seed=seed,
    )
