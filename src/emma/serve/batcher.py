"""Request queue and dynamic batching in front of an :class:`~emma.infer.engine.Engine`.

One asyncio queue with a fixed capacity holds the admitted requests; a full queue refuses at once
(:class:`QueueFullError`, the server's 503 with ``Retry-After``). One worker task takes requests off the
queue and runs every engine call on one dedicated engine thread (a single-thread executor), so the
event loop keeps answering (health checks, new requests, disconnects) while the model works.

Prompts are built before a request is queued, on a second dedicated thread (the preparation thread),
never on the engine thread: an engine that ``prepares_prompts`` (the TransformersEngine) tokenizes and
processes the request's images there (``engine.prepare``), so a long prompt being tokenized never
holds up a batch that is generating, and the engine thread only batches and generates. Both threads
use the tokenizer, each always in the same way (the preparation thread encodes without padding; the
engine thread decodes).

- Non-streaming requests are batched: the worker takes the first waiting request plus every request
  already queued, up to ``max_batch_size``, and waits up to ``batch_wait_ms`` for more only while other
  requests are known to be on their way (an :class:`Arrival` is open for each: the server opens one
  when a chat request comes in, and it closes when the request is queued or refused), so a lone
  request is never delayed. The whole batch goes to ``engine.generate`` in one call.
- Streaming requests are batched the same way with other streams of the same sampling settings
  (``SamplingParams.batch_key``) when the engine has ``stream_many`` (the TransformersEngine does:
  one batched generation; the OpenAIEngine too: the streams go to its server together), each stream
  getting its own chunks as they come and ending as soon as its own answer does. Engines with only
  ``stream`` (the Engine interface) stream one request at a time.
  Streams and non-streaming batches run in queue order; a stream that arrives while a batch runs
  waits for it (no continuous batching).
- Prompt bound: unusable input or a prompt over ``max_prompt_tokens`` fails that request alone
  (:class:`PromptError`, the server's 400), before it is queued. An engine that checks prompts itself
  while building them (``checks_prompt_tokens``, e.g. the TransformersEngine) gets the bound on each
  request (``GenerationRequest.max_prompt_tokens``) and raises its typed input errors from
  ``prepare``, so the prompt is built once. Any other engine has each prompt counted with
  ``engine.count_tokens`` on the preparation thread. (``count_prompts=False`` skips both, for remote
  engines whose server enforces its own bounds and where counting costs a request.)
- Cancellation: a request whose ``cancel`` event is set is skipped if still queued and stopped by the
  engine at its next token if running. :meth:`Batcher.generate` and the iterator of
  :meth:`Batcher.open_stream` poll the caller's ``is_disconnected`` while they wait and set ``cancel``
  when the client has gone.

Why one file (~720 lines): the queue, the preparation thread, batched generation and streams share
one set of locks and counters, whose invariants are easier to check on one page.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from emma.errors import EmmaError, require_at_least
from emma.infer.engine import Engine
from emma.infer.types import GenerationRequest, GenerationResponse, StreamChunk

IsDisconnected = Callable[[], Awaitable[bool]]

DEFAULT_POLL_S = 0.2  # how often a waiting caller checks whether its client is still there


class BatcherError(Exception):
    """Base of the batcher's errors (messages carry no request content)."""


class QueueFullError(BatcherError):
    """The queue is at capacity: answer 503 and ask the client to retry later."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        super().__init__(f"the request queue is full ({capacity} waiting); retry later")
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class PromptError(BatcherError):
    """The request cannot be generated: unusable input or a prompt over the token bound."""

    def __init__(self, message: str, *, n_tokens: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.n_tokens = n_tokens
        self.limit = limit


class EngineFailure(BatcherError):
    """The engine raised (a bug or a broken backend); the message names only the exception type."""


class ClientGone(BatcherError):
    """The client disconnected while its request waited or streamed; its generation was cancelled."""


class ShuttingDown(BatcherError):
    """The server is stopping; queued requests are refused."""


class Arrival:
    """A request on its way to the queue (body being read, images being decoded): while any is open,
    the worker may wait up to ``batch_wait_ms`` to batch it. Close it with :meth:`done` (idempotent)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._open = True
        batcher._arriving += 1

    def done(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arrived()


class _End:
    """Marks the end of a stream's events."""


class _Started:
    """Marks that a streaming request passed its prompt check and is generating."""


_END = _End()
_STARTED = _Started()

StreamEvent = StreamChunk | _End | _Started | BaseException


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    stream: bool
    future: asyncio.Future[GenerationResponse] | None = None
    events: asyncio.Queue[StreamEvent] | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queue + dynamic batching + streaming in front of one engine (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        queue_capacity: int = 64,
        max_prompt_tokens: int | None = None,
        retry_after_s: int = 1,
        poll_s: float = DEFAULT_POLL_S,
        count_prompts: bool = True,
    ) -> None:
        require_at_least("max_batch_size", max_batch_size, 1)
        require_at_least("queue_capacity", queue_capacity, 1)
        require_at_least("batch_wait_ms", batch_wait_ms, 0)
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.capacity = queue_capacity
        self.max_prompt_tokens = max_prompt_tokens
        self.retry_after_s = retry_after_s
        self.poll_s = poll_s
        self.count_prompts = count_prompts  # off for remote engines, where counting costs a request
        # The engine bounds prompts itself while building them: no separate count (one prompt build).
        self.engine_checks_prompts = count_prompts and engine.capabilities.checks_prompt_tokens
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._prep: ThreadPoolExecutor | None = None  # builds prompts, never on the engine thread
        self._active: list[_Job] = []
        self._arriving = 0
        self._wake: asyncio.Event | None = None  # set when a job is queued or an arrival closes
        self._stopping = False
        self.batches_run = 0  # engine.generate calls so far (for tests and benchmarks)
        self.largest_batch = 0

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the ones generating now)."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def active(self) -> int:
        """Requests the engine is working on now."""
        return len(self._active)

    async def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self.running:
            return
        self._stopping = False
        self._queue = asyncio.Queue(maxsize=self.capacity)
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emma-engine")
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emma-prepare")
        self._worker = asyncio.create_task(self._work(), name="emma-batcher")

    async def _ensure_started(self) -> None:
        # Normally started by the app's lifespan; started here too for hosts that run no lifespan.
        if not self.running and not self._stopping:
            await self.start()

    async def stop(self) -> None:
        """Cancel what runs, refuse what waits, and stop the worker."""
        self._stopping = True
        for job in self._active:
            job.request.cancel.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                job = self._queue.get_nowait()
                job.request.cancel.set()
                _fail(job, ShuttingDown("the server is shutting down"))
        for job in self._active:
            _fail(job, ShuttingDown("the server is shutting down"))
        self._active = []
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._prep is not None:
            self._prep.shutdown(wait=False, cancel_futures=True)
        self._worker = None
        self._queue = None
        self._executor = None
        self._prep = None

    def arrival(self) -> Arrival:
        """Mark a request as on its way so the worker may wait briefly to batch it (call from the
        event loop; pass it to :meth:`generate` / :meth:`open_stream`, which close it once queued)."""
        return Arrival(self)

    def _arrived(self) -> None:
        self._arriving -= 1
        if self._wake is not None:
            self._wake.set()

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """An :meth:`arrival` open for the duration of the ``with`` block."""
        arrival = self.arrival()
        try:
            yield
        finally:
            arrival.done()

    # ------------------------------------------------------------------------------ submitting

    def _check_open(self) -> asyncio.Queue[_Job]:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        if not self.running or self._queue is None:
            raise BatcherError("the batcher is not running (start() it on the server's event loop)")
        if self._queue.full():
            raise QueueFullError(self.capacity, self.retry_after_s)
        return self._queue

    async def _prepare(self, request: GenerationRequest, arrival: Arrival | None) -> None:
        """Build (or count) the request's prompt on the preparation thread; PromptError when unusable
        or over the bound. Refuses at once when the queue is already full (nothing is built then)."""
        try:
            self._check_open()
            if self.engine_checks_prompts and self.max_prompt_tokens is not None:
                own = request.max_prompt_tokens
                request.max_prompt_tokens = (
                    self.max_prompt_tokens if own is None else min(own, self.max_prompt_tokens)
                )
            if not self.count_prompts or self._prep is None:
                return
            await asyncio.get_running_loop().run_in_executor(self._prep, self._prepare_sync, request)
        except BaseException:
            if arrival is not None:
                arrival.done()
            raise

    def _prepare_sync(self, request: GenerationRequest) -> None:
        """On the preparation thread: ``engine.prepare`` (engines that prepare prompts), and a count
        against the bound for engines that do not check prompts themselves."""
        if self.engine.capabilities.prepares_prompts:
            try:
                self.engine.prepare(request)  # type: ignore[attr-defined]
            except EmmaError as exc:
                raise _prompt_error(exc) from None
            except Exception as exc:  # noqa: BLE001 — a broken engine fails its request, not the server
                raise EngineFailure(f"engine failed building the prompt ({type(exc).__name__})") from None
        try:
            self._check_prompt(request)
        except PromptError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise EngineFailure(f"engine failed counting tokens ({type(exc).__name__})") from None

    def _enqueue(self, request: GenerationRequest, *, stream: bool) -> _Job:
        queue = self._check_open()
        loop = asyncio.get_running_loop()
        job = _Job(request=request, stream=stream)
        if stream:
            job.events = asyncio.Queue()
        else:
            job.future = loop.create_future()
        try:
            queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFullError(self.capacity, self.retry_after_s) from None
        if self._wake is not None:
            self._wake.set()
        return job

    def _submit(self, request: GenerationRequest, *, stream: bool, arrival: Arrival | None) -> _Job:
        try:
            return self._enqueue(request, stream=stream)
        finally:
            if arrival is not None:
                arrival.done()  # queued (or refused): no longer on its way

    async def generate(
        self,
        request: GenerationRequest,
        *,
        is_disconnected: IsDisconnected | None = None,
        arrival: Arrival | None = None,
    ) -> GenerationResponse:
        """Queue ``request`` and wait for its response (batched with others).

        Raises :class:`QueueFullError` at once when the queue is full, :class:`PromptError` for unusable
        input, :class:`ClientGone` when ``is_disconnected`` reports the client left (its generation is
        cancelled), :class:`EngineFailure` when the engine raised. ``arrival`` (the request's own) is
        closed once the request is queued. The prompt is built before it is queued (see the module).
        """
        await self._ensure_started()
        await self._prepare(request, arrival)
        job = self._submit(request, stream=False, arrival=arrival)
        assert job.future is not None
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=self.poll_s)
                if done:
                    return job.future.result()
                if is_disconnected is not None and await is_disconnected():
                    raise ClientGone("client disconnected")
        except (asyncio.CancelledError, ClientGone):
            request.cancel.set()
            job.future.cancel()  # nobody waits for it any more; the worker skips or drops its result
            raise

    async def open_stream(
        self,
        request: GenerationRequest,
        *,
        is_disconnected: IsDisconnected | None = None,
        arrival: Arrival | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Queue a streaming request and wait until it starts generating; then iterate its chunks.

        Everything that can refuse the request (full queue, prompt check) raises here, before any
        response is sent. Leaving the returned iterator early (client gone) cancels the generation.
        """
        await self._ensure_started()
        await self._prepare(request, arrival)
        job = self._submit(request, stream=True, arrival=arrival)
        try:
            first = await self._next_event(job, is_disconnected)
        except BaseException:
            request.cancel.set()
            raise
        if isinstance(first, BaseException):
            raise first
        if isinstance(first, _End):  # cancelled before it started
            raise ClientGone("client disconnected")
        return self._iterate(job, is_disconnected)

    async def _iterate(self, job: _Job, is_disconnected: IsDisconnected | None) -> AsyncIterator[StreamChunk]:
        try:
            while True:
                event = await self._next_event(job, is_disconnected)
                if isinstance(event, _End):
                    return
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, StreamChunk):
                    yield event
        finally:
            # Normal end: a no-op. Consumer gone (closed, cancelled, disconnected): stops the engine.
            job.request.cancel.set()

    async def _next_event(self, job: _Job, is_disconnected: IsDisconnected | None) -> StreamEvent:
        assert job.events is not None
        last_check = time.perf_counter()
        while True:
            try:
                event = job.events.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=self.poll_s)
                except TimeoutError:
                    event = None
            now = time.perf_counter()
            if is_disconnected is not None and (event is None or now - last_check >= self.poll_s):
                last_check = now
                if await is_disconnected():
                    job.request.cancel.set()
                    raise ClientGone("client disconnected")
            if event is not None:
                return event

    # ---------------------------------------------------------------------------------- worker

    @property
    def batches_streams(self) -> bool:
        """Whether concurrent streams with the same sampling settings share one batch (the engine has
        ``stream_many``); otherwise streams run one at a time."""
        return self.engine.capabilities.batched_streams and self.max_batch_size > 1

    async def _work(self) -> None:
        assert self._queue is not None
        held: _Job | None = None
        while True:
            job = held if held is not None else await self._queue.get()
            if job.stream:
                key = job.request.sampling.batch_key()
                if self.batches_streams:
                    # stream_many takes at most the engine's own batch size in one call
                    own = self.engine.capabilities.max_batch_size
                    limit = min(self.max_batch_size, own) if own is not None and own >= 1 else None
                    batch, held = await self._gather(
                        job, lambda j, k=key: j.stream and j.request.sampling.batch_key() == k, limit
                    )
                else:
                    batch, held = [job], None
                await self._guarded(self._run_streams(batch), batch)
            else:
                batch, held = await self._gather(job, lambda j: not j.stream)
                await self._guarded(self._run_batch(batch), batch)

    async def _gather(
        self, first: _Job, joins: Callable[[_Job], bool], limit: int | None = None
    ) -> tuple[list[_Job], _Job | None]:
        """``first`` plus the queued jobs that ``joins`` accepts, up to ``limit`` (default
        ``max_batch_size``), waiting up to
        ``batch_wait_ms`` only while requests are known to be on their way (never for a lone one). The
        first job that cannot join is returned apart, to run next (queue order is kept)."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [first]
        deadline = loop.time() + self.batch_wait_s
        while len(batch) < (limit or self.max_batch_size):
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if self._arriving <= 0 or remaining <= 0 or self._wake is None:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=remaining)
                continue
            if not joins(nxt):
                return batch, nxt
            batch.append(nxt)
        return batch, None

    async def _guarded(self, run: Awaitable[None], jobs: list[_Job]) -> None:
        """Run one unit of work; if it fails unexpectedly, fail its jobs and keep the worker alive."""
        try:
            await run
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — the worker must outlive any one failure
            for job in jobs:
                _fail(job, EngineFailure(f"engine failed ({type(exc).__name__})"))

    def _check_prompt(self, request: GenerationRequest) -> int | None:
        """Count the prompt (on the preparation thread); raise PromptError for unusable or over-long
        input. (Nothing to do when the engine checks prompts itself, or counting is off.)"""
        if not self.count_prompts or self.engine_checks_prompts:
            return None
        try:
            n = self.engine.count_tokens(request)
        except EmmaError as exc:
            raise _prompt_error(exc) from None
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise PromptError(
                f"the prompt has {n} tokens (images included), over the limit of {self.max_prompt_tokens}",
                n_tokens=n,
                limit=self.max_prompt_tokens,
            )
        return n

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[GenerationResponse | BaseException]:
        """On the engine thread: one generate call (prompts were built or counted before queueing)."""
        out: list[GenerationResponse | BaseException | None] = [None] * len(requests)
        live = list(range(len(requests)))
        if live:
            try:
                responses = self.engine.generate([requests[i] for i in live])
                if len(responses) != len(live):
                    raise RuntimeError("engine returned a wrong number of responses")
            except Exception as exc:  # noqa: BLE001
                failure = EngineFailure(f"engine failed ({type(exc).__name__})")
                for i in live:
                    out[i] = failure
            else:
                for i, response in zip(live, responses, strict=True):
                    out[i] = self._input_error(response) or response
        return [o if o is not None else EngineFailure("no response") for o in out]

    def _input_error(self, response: GenerationResponse) -> PromptError | None:
        """The PromptError of an engine's typed input-error response (engines that check prompts)."""
        if response.finish_reason != "error" or response.error_kind not in ("input", "prompt_too_long"):
            return None
        message = _strip_type(response.error or "") or "unusable input"
        if response.error_kind == "input":
            return PromptError(message)
        n = response.prompt_tokens
        limits = [b for b in (self.max_prompt_tokens, self.engine.capabilities.max_prompt_tokens) if b]
        exceeded = [b for b in limits if isinstance(b, int) and n > b]
        return PromptError(message, n_tokens=n, limit=min(exceeded) if exceeded else None)

    @contextlib.contextmanager
    def _running(self, live: list[_Job]) -> Iterator[None]:
        """``live`` in the engine (a batch or a batch of streams): counted, held as ``_active`` while it
        runs, its requests cancelled when the awaiting task is."""
        self._active = live
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(live))
        try:
            yield
        except asyncio.CancelledError:
            for job in live:
                job.request.cancel.set()
            raise
        finally:
            self._active = []

    async def _run_batch(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        live = []
        for job in batch:
            if job.request.cancel.is_set() or (job.future is not None and job.future.done()):
                _resolve(job, GenerationResponse(job.request.request_id, "", "cancelled"))
            else:
                live.append(job)
        if not live:
            return
        with self._running(live):
            assert self._executor is not None
            results = await loop.run_in_executor(
                self._executor, self._generate_sync, [j.request for j in live]
            )
        for job, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                _fail(job, result)
            else:
                _resolve(job, result)

    def _admit(self, job: _Job, channel: _Channel) -> bool:
        """Before the engine: a cancelled stream just ends. An engine that checks prompts raises (or
        reports) its input errors before the first chunk, so the stream counts as started (the client
        gets its 200) only once that chunk has come; else at once."""
        if job.request.cancel.is_set():
            channel.end()
            return False
        if not self.engine_checks_prompts:
            channel.start()
        return True

    def _stream_sync(self, job: _Job, emit: Callable[[StreamEvent], None]) -> None:
        """One stream through ``engine.stream``."""
        channel = _Channel(emit)
        try:
            if not self._admit(job, channel):
                return
            chunks = self.engine.stream(job.request)
            try:
                for chunk in chunks:  # after request.cancel is set the engine ends with "cancelled"
                    channel.chunk(chunk)
                    if chunk.response is not None:
                        break
            finally:
                _close(chunks)
        except EmmaError as exc:
            channel.fail(_prompt_error(exc))
        except Exception as exc:  # noqa: BLE001 — reported to the client as a server error
            channel.fail(EngineFailure(f"engine failed ({type(exc).__name__})"))
        finally:
            channel.start()  # a stream that ended without a chunk: reported as a failed generation
            channel.end()

    def _stream_many_sync(self, jobs: list[_Job], emits: list[Callable[[StreamEvent], None]]) -> None:
        """Several streams through ``engine.stream_many``: events routed to each job's channel, each
        job ended as soon as its own final chunk comes."""
        channels = [_Channel(emit) for emit in emits]
        try:
            live = [i for i, job in enumerate(jobs) if self._admit(job, channels[i])]
            if not live:
                return
            pairs = self.engine.stream_many([jobs[i].request for i in live])  # type: ignore[attr-defined]
            try:
                for row, chunk in pairs:
                    channel = channels[live[row]]
                    refused = self._input_error(chunk.response) if chunk.response is not None else None
                    if refused is not None and not channel.started:
                        channel.fail(refused)
                        continue
                    channel.chunk(chunk)
                    if chunk.response is not None:
                        channel.end()
            finally:
                _close(pairs)
        except Exception as exc:  # noqa: BLE001 — reported to each unfinished client as a server error
            for channel in channels:
                channel.fail(EngineFailure(f"engine failed ({type(exc).__name__})"))
        finally:
            for channel in channels:
                channel.start()  # a stream that ended without a chunk: reported as a failed generation
                channel.end()

    async def _run_streams(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        live = []
        for job in jobs:
            assert job.events is not None
            if job.request.cancel.is_set():
                job.events.put_nowait(_END)
            else:
                live.append(job)
        if not live:
            return
        assert self._executor is not None

        def emitter(events: asyncio.Queue[StreamEvent]) -> Callable[[StreamEvent], None]:
            def emit(event: StreamEvent) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed under a late event (shutdown)
                    loop.call_soon_threadsafe(events.put_nowait, event)

            return emit

        emits = [emitter(job.events) for job in live if job.events is not None]
        with self._running(live):
            if len(live) == 1:
                await loop.run_in_executor(self._executor, self._stream_sync, live[0], emits[0])
            else:
                await loop.run_in_executor(self._executor, self._stream_many_sync, live, emits)


@dataclass
class _Channel:
    """One stream's events as the engine thread sends them: started at most once, ended at most once,
    nothing after the end."""

    emit: Callable[[StreamEvent], None]
    started: bool = False
    ended: bool = False

    def start(self) -> None:
        if not self.started and not self.ended:
            self.started = True
            self.emit(_STARTED)

    def chunk(self, chunk: StreamChunk) -> None:
        if not self.ended:
            self.start()
            self.emit(chunk)

    def fail(self, exc: BaseException) -> None:
        """An error in place of the stream (before it started: the server's 4xx/5xx) or inside it."""
        if not self.ended:
            self.emit(exc)
            self.ended = True
            self.emit(_END)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.emit(_END)


def _close(chunks: object) -> None:
    """Close an engine's chunk iterator (a generator: stops its generation thread) if it can be closed."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


def _prompt_error(exc: EmmaError) -> PromptError:
    """An engine's input error as a PromptError; an over-long prompt keeps its length and bound."""
    n_tokens = getattr(exc, "n_tokens", None)
    limit = getattr(exc, "limit", None)
    return PromptError(
        _first_line(str(exc)) or "unusable input",
        n_tokens=n_tokens if isinstance(n_tokens, int) else None,
        limit=limit if isinstance(limit, int) else None,
    )


def _strip_type(error: str) -> str:
    """``"InputError: message"`` (an engine's error line) → ``"message"``."""
    head, sep, rest = error.partition(": ")
    return rest.strip()[:300] if sep and head.isidentifier() else error.strip()[:300]


def _resolve(job: _Job, response: GenerationResponse) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_result(response)


def _fail(job: _Job, exc: BaseException) -> None:
    if job.future is not None:
        if not job.future.done():
            job.future.set_exception(exc)
    elif job.events is not None:
        job.events.put_nowait(exc)
        job.events.put_nowait(_END)
