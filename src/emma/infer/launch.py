"""External OpenAI-compatible engine servers that EMMA starts and stops: llama.cpp and vLLM.

One home for "an engine server in a subprocess": :func:`launch_engine` builds the server's command line
(:func:`llamacpp_command`, :func:`vllm_command`), starts it on a free loopback port in its own process
group, waits until ``GET /v1/models`` answers (bounded by a timeout; a server that exits first fails at
once with the last lines of its output), and returns a :class:`LaunchedEngine`: the ordinary
:class:`~emma.infer.openai_engine.OpenAIEngine` pointed at it, whose ``close`` also stops the server
(SIGTERM to its process group, then SIGKILL after a grace period). Streaming, cancellation and error
reporting are OpenAIEngine's. ``emma serve --backend llamacpp|vllm`` puts EMMA's server (DICOM and
volumes through emma.io, de-identification, modes, limits, API key) in front of it.

The backend listens on 127.0.0.1 only and requires a random API key made for this launch, given to it
in its environment (``API_KEY`` for llama-cpp-python's server, ``VLLM_API_KEY`` for vLLM), never on its
command line (which every local user can read): other local users cannot use the engine behind EMMA's
back.

- **llama.cpp** (``pip install 'emma-med[llamacpp]'``): ``python -m llama_cpp.server`` from
  llama-cpp-python, on a GGUF that ``emma export --to gguf`` writes. With a vision projector
  (``mmproj``) it runs llama.cpp's generic multimodal path (``--chat_format mtmd``, the chat template
  stored in the GGUF); without one the model is text-only (emma-tiny's case: llama.cpp cannot run its
  ResNet tower). ``--interrupt_requests False``: by default that server ends a running stream as soon as
  another request arrives, which a server with several clients in front of it must not do. It runs one
  request at a time (no batching): concurrent requests wait for each other.
- **llama-server** (llama.cpp's own C++ server, when installed: a llama.cpp build, a distribution
  package): the same GGUF files, decoded in ``concurrency`` slots together (continuous batching), so
  concurrent requests do not wait for each other; key in ``LLAMA_API_KEY``.
- **vLLM** (GPU machines; ``vllm serve``): the family's image limit (``--limit-mm-per-prompt``), its
  serving context (:attr:`emma.model.families.FamilySpec.vllm_max_model_len`, ``--max-model-len``) and,
  for a model folder, the processor's own chat template file (the one the in-process engine applies, so
  prompts match; a tokenizer's template can be a text-only one).

``command`` replaces the executable (e.g. ``["/opt/vllm/bin/vllm"]``, or a test's scripted server);
the arguments stay the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import httpx

from emma.errors import EmmaError, InputError, require_at_least
from emma.infer.openai_engine import OpenAIEngine

BACKENDS = ("llamacpp", "llama-server", "vllm")
LOOPBACK = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT_S = 600.0  # vLLM loads and compiles a model for minutes on a GPU
DEFAULT_STOP_GRACE_S = 15.0
LLAMACPP_CONTEXT = 4096
_LOG_TAIL_LINES = 5
_LOG_TAIL_CHARS = 300
_LINE_CHARS = 2000
_POLL_S = 0.2


class LaunchError(EmmaError):
    """An engine server could not be started (missing package or executable, exit, timeout)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _model_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found (a .gguf file): {path}")
    if path.suffix.lower() != ".gguf":
        raise InputError(f"{what} is not a .gguf file: {path.name}")
    return path.resolve()


def llamacpp_command(
    model: Path,
    *,
    port: int,
    mmproj: Path | None = None,
    context_tokens: int = LLAMACPP_CONTEXT,
    threads: int | None = None,
    served_name: str | None = None,
    command: Sequence[str] | None = None,
) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on ``model`` (a GGUF), loopback only."""
    require_at_least("context_tokens", context_tokens, 1)
    model = _model_file(model, "GGUF model")
    argv = list(command) if command else [sys.executable, "-m", "llama_cpp.server"]
    argv += [
        "--model",
        str(model),
        "--model_alias",
        served_name or model.stem,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--n_ctx",
        str(context_tokens),
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    if threads is not None:
        require_at_least("threads", threads, 1)
        argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    if mmproj is not None:
        argv += [
            "--clip_model_path",
            str(_model_file(mmproj, "vision projector (mmproj)")),
            "--chat_format",
            "mtmd",
        ]
    return argv


def llama_server_command(
    model: Path,
    *,
    port: int,
    mmproj: Path | None = None,
    context_tokens: int = LLAMACPP_CONTEXT,
    parallel: int = 4,
    threads: int | None = None,
    served_name: str | None = None,
    command: Sequence[str] | None = None,
) -> list[str]:
    """llama.cpp's own C++ ``llama-server`` on ``model``: ``parallel`` slots decoded together
    (continuous batching) sharing ``context_tokens`` of KV cache, the GGUF's chat template (``--jinja``),
    no web UI, loopback only."""
    require_at_least("context_tokens", context_tokens, 1)
    require_at_least("parallel", parallel, 1)
    model = _model_file(model, "GGUF model")
    argv = list(command) if command else ["llama-server"]
    argv += [
        "--model",
        str(model),
        "--alias",
        served_name or model.stem,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]
    argv += ["--ctx-size", str(context_tokens), "--parallel", str(parallel), "--cont-batching", "--jinja"]
    argv += ["--no-webui"]
    if threads is not None:
        require_at_least("threads", threads, 1)
        argv += ["--threads", str(threads), "--threads-batch", str(threads)]
    if mmproj is not None:
        argv += ["--mmproj", str(_model_file(mmproj, "vision projector (mmproj)"))]
    return argv


def processor_chat_template(folder: Path) -> Path | None:
    """The chat template file a processor saved in a model folder (``chat_template.jinja``, else the
    legacy ``chat_template.json``), or None."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def vllm_command(
    model: str,
    *,
    port: int,
    family: str | None = None,
    max_images: int | None = None,
    max_model_len: int | None = None,
    chat_template: Path | None = None,
    served_name: str | None = None,
    command: Sequence[str] | None = None,
) -> list[str]:
    """``vllm serve MODEL`` with the family's image limit, serving context and chat template.

    ``max_images`` and ``max_model_len`` default to the family's (:class:`FamilySpec` ``max_images``,
    ``vllm_max_model_len``); ``chat_template`` to the processor's template file of a model folder.
    """
    from emma.model.families import get_family

    spec = get_family(family) if family else None
    images = max_images if max_images is not None else (spec.max_images if spec else None)
    length = max_model_len if max_model_len is not None else (spec.vllm_max_model_len if spec else None)
    folder = Path(model)
    template = chat_template or (processor_chat_template(folder) if folder.is_dir() else None)
    argv = list(command) if command else ["vllm"]
    argv += ["serve", model, "--host", LOOPBACK, "--port", str(port)]
    argv += ["--served-model-name", served_name or (folder.name if folder.is_dir() else model)]
    if images is not None:
        require_at_least("max_images", images, 0)
        argv += ["--limit-mm-per-prompt", json.dumps({"image": images})]
    if length is not None:
        require_at_least("max_model_len", length, 1)
        argv += ["--max-model-len", str(length)]
    if template is not None:
        argv += ["--chat-template", str(template)]
    return argv


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a function for the child before exec that asks for SIGTERM when the thread that started
    it ends, so that a killed ``emma serve`` leaves no engine server (and no GPU memory) behind. The
    C function is looked up here, in the parent: between fork and exec the child only calls it (no
    library loading, no lock another thread of the parent could have held)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return partial(prctl, pr_set_pdeathsig, int(signal.SIGTERM))


class ServerProcess:
    """One engine server in a subprocess (its own process group); the last lines of its output are kept
    in memory (a thread drains the pipe, so neither memory nor a log file grows with a long run).

    ``wait_ready`` polls ``GET {base_url}/models`` with the key until it answers 200 and names the
    served model; ``stop`` ends the whole process group (vLLM runs its engine in child processes).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        base_url: str,
        api_key: str,
        env: Mapping[str, str] | None = None,
        label: str = "engine",
    ) -> None:
        self.argv = list(argv)
        self.base_url = base_url
        self.label = label
        self._api_key = api_key
        self._lines: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        child_env = {k: v for k, v in os.environ.items() if k not in ("EMMA_API_KEY", "OPENAI_API_KEY")}
        child_env.update(env or {})
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
            )
        except OSError as exc:
            raise LaunchError(
                f"cannot start the {label} server ({self.argv[0]}): {exc.strerror or exc}"
            ) from None
        self._drain = threading.Thread(target=self._read_output, name=f"emma-{label}-output", daemon=True)
        self._drain.start()
        self.model_id: str | None = None

    def _read_output(self) -> None:
        """Keep the last lines of the server's output (each cut to ``_LINE_CHARS``) until it closes."""
        assert self.proc.stdout is not None
        with self.proc.stdout as stream:
            while line := stream.readline(_LINE_CHARS):
                text = " ".join(line.decode(errors="replace").split())
                if text:
                    self._lines.append(text)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        """The server's last output lines, on one line (for error messages)."""
        if self.proc.poll() is not None:
            self._drain.join(timeout=1.0)  # the lines written before it exited
        return " | ".join(list(self._lines))[-_LOG_TAIL_CHARS:]

    def wait_ready(self, timeout_s: float) -> str:
        """The served model's id once ``/v1/models`` answers; :class:`LaunchError` if the server exits
        or is not ready within ``timeout_s`` (the server is then stopped)."""
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self._api_key}"}
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    tail = self.log_tail()
                    self.stop()
                    raise LaunchError(
                        f"the {self.label} server exited with code {code} while starting: {tail}"
                    )
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                    answer = client.get(f"{self.base_url}/models", headers=headers)
                    if answer.status_code == 200:
                        self.model_id = str(answer.json()["data"][0]["id"])
                        return self.model_id
                if time.monotonic() >= deadline:
                    tail = self.log_tail()
                    self.stop()
                    raise LaunchError(
                        f"the {self.label} server was not ready after {timeout_s:.0f} s: {tail}"
                    )
                time.sleep(_POLL_S)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``; the exit code. Idempotent."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        self._signal_group(signal.SIGKILL)  # children left behind by a leader that exited
        self._drain.join(timeout=grace_s)
        return self.proc.returncode


class LaunchedEngine(OpenAIEngine):
    """An :class:`OpenAIEngine` on a server this engine started; ``close`` stops the server too."""

    def __init__(self, server: ServerProcess, model: str, *, api_key: str, **options: object) -> None:
        super().__init__(server.base_url, model, api_key=api_key, **options)  # type: ignore[arg-type]
        self.server = server
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            super().close()
        finally:
            self.server.stop()


def launch_engine(
    backend: str,
    model: str,
    *,
    family: str | None = None,
    mmproj: Path | None = None,
    max_images: int | None = None,
    max_model_len: int | None = None,
    threads: int | None = None,
    command: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    concurrency: int = 8,
    timeout: float = 600,
) -> LaunchedEngine:
    """Start ``backend`` ("llamacpp", "llama-server" or "vllm") on ``model`` and return an engine on it
    (see the module).

    ``model``: a GGUF file (llamacpp, llama-server); a model folder or hub id (vllm). ``concurrency``:
    requests the engine sends at once, and llama-server's slots. ``extra_args`` go to the backend's
    command line as they are. ``max_model_len``: llama.cpp's context (default 4096) or vLLM's
    ``--max-model-len`` (default the family's). ``family`` gives EMMA's prompt and box conventions (for
    vLLM on a model folder, read from its ``config.json`` when not given). Call it from a thread that
    outlives the engine, e.g. the main thread: on Linux the server gets SIGTERM when that thread ends.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown engine backend {backend[:20]!r}; known: {', '.join(BACKENDS)}")
    require_at_least("startup_timeout_s", startup_timeout_s, 1)
    if family:
        from emma.model.families import get_family

        family = get_family(family).name
    elif backend == "vllm" and Path(model).is_dir():
        from emma.model.loading import detect_family

        with contextlib.suppress(EmmaError):  # a family EMMA does not know: vLLM's own defaults
            family = detect_family(Path(model))
    port = free_port()
    key = secrets.token_urlsafe(24)
    if backend == "llamacpp":
        if command is None and not _has_module("llama_cpp"):
            raise LaunchError("llama.cpp is not installed: pip install 'emma-med[llamacpp]'")
        argv = llamacpp_command(
            Path(model),
            port=port,
            mmproj=mmproj,
            context_tokens=max_model_len or LLAMACPP_CONTEXT,
            threads=threads,
            command=command,
        )
        env = {"API_KEY": key}
        images = None if mmproj is not None else 0  # a language model alone would drop images silently
    elif backend == "llama-server":
        argv = llama_server_command(
            Path(model),
            port=port,
            mmproj=mmproj,
            context_tokens=max_model_len or LLAMACPP_CONTEXT,
            parallel=concurrency,
            threads=threads,
            command=command,
        )
        env = {"LLAMA_API_KEY": key}
        images = None if mmproj is not None else 0
    else:
        if mmproj is not None:
            raise InputError("--mmproj is for llama.cpp; vLLM reads the vision tower from the model")
        argv = vllm_command(
            model,
            port=port,
            family=family,
            max_images=max_images,
            max_model_len=max_model_len,
            command=command,
        )
        env = {"VLLM_API_KEY": key}
        images = _limit_flag(argv, "--limit-mm-per-prompt")
    argv += list(extra_args)
    server = ServerProcess(argv, base_url=f"http://{LOOPBACK}:{port}/v1", api_key=key, env=env, label=backend)
    try:
        model_id = server.wait_ready(startup_timeout_s)
    except BaseException:
        server.stop()
        raise
    return LaunchedEngine(
        server,
        model_id,
        api_key=key,
        family=family,
        concurrency=concurrency,
        timeout=timeout,
        max_images=images,
    )


def _limit_flag(argv: Sequence[str], flag: str) -> int | None:
    """The image count of vLLM's ``--limit-mm-per-prompt '{"image": N}'`` in ``argv``, or None."""
    if flag not in argv:
        return None
    return int(json.loads(argv[argv.index(flag) + 1])["image"])


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
