"""``emma serve``: the OpenAI-compatible server and web UI under uvicorn."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from emma.cli import app
from emma.cli.common import fail, handle_errors

if TYPE_CHECKING:
    from emma.infer.engine import Engine
    from emma.serve.app import ServeSettings

DEFAULT_MODEL = "emma-tiny"
BACKENDS = ("transformers", "llamacpp", "llama-server", "vllm")


def _audit_to_stderr() -> None:
    """Audit lines (no content, see emma.serve.security) go to stderr, one per request."""
    from emma.serve.security import AUDIT_LOGGER_NAME

    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s audit %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@app.command()
@handle_errors
def serve(
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m", help="Model spec: emma-tiny, a folder, a hub id, openai:URL#MODEL."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="EMMA_API_KEY",
        show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1/*. Prefer setting EMMA_API_KEY: a value on the "
        "command line is visible to every local user (ps, /proc/PID/cmdline).",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Allow a non-loopback --host without an API key (anyone on the network can use it).",
    ),
    allow_remote_images: bool = typer.Option(
        False, "--allow-remote-images", help="Fetch http(s) image URLs whose host is an --allowed-domain."
    ),
    allowed_domain: list[str] = typer.Option(
        [], "--allowed-domain", help="A host (and its subdomains) remote images may come from; repeatable."
    ),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Requests per engine batch."),
    queue_capacity: int = typer.Option(64, "--queue-capacity", min=1, help="Waiting requests before 503."),
    batch_wait_ms: float = typer.Option(
        5.0, "--batch-wait-ms", min=0.0, help="Longest wait to fill a batch."
    ),
    max_images: int = typer.Option(16, "--max-images", min=1, help="Model-ready images per request."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", min=0.01, help="Largest request body, MiB."),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=1, help="Largest max_tokens a request may ask."),
    memory_budget_mb: int = typer.Option(
        2048,
        "--memory-budget-mb",
        min=16,
        help="Memory for requests in flight (bodies, image decoding, model-ready images), reserved before "
        "use: 413 for a request that can never fit, 503 + Retry-After while others hold it.",
    ),
    max_text_chars: int = typer.Option(
        256 * 1024,
        "--max-text-chars",
        min=1,
        help="Characters of text per request, checked before tokenizing.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N (in-process models)."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto, float32, bfloat16, float16 (in-process models)."
    ),
    backend: str = typer.Option(
        "transformers",
        "--backend",
        help="transformers (in-process); llamacpp (llama-cpp-python's server) or llama-server (llama.cpp's "
        "C++ server, batching --max-batch-size requests), --model a .gguf file; vllm, --model a folder or hub "
        "id: EMMA starts that engine server on loopback, stays in front of it and stops it on exit.",
    ),
    mmproj: Path | None = typer.Option(
        None,
        "--mmproj",
        help="llamacpp, llama-server: the vision projector GGUF (emma export --to gguf); else text-only.",
    ),
    family: str | None = typer.Option(
        None,
        "--family",
        help="llamacpp, llama-server, vllm: the model family (prompt and box conventions, vLLM limits).",
    ),
    max_model_len: int | None = typer.Option(
        None,
        "--max-model-len",
        min=1,
        help="llamacpp, llama-server: context tokens (4096); vllm: --max-model-len (family's).",
    ),
    backend_command: str | None = typer.Option(
        None, "--backend-command", help="The engine server's executable (e.g. a vllm in another environment)."
    ),
    backend_arg: list[str] = typer.Option(
        [], "--backend-arg", help="One more argument for the engine server's command line; repeatable."
    ),
    startup_timeout_s: float = typer.Option(
        600.0, "--startup-timeout-s", min=1.0, help="Longest wait for the engine server to answer."
    ),
) -> None:
    """Serve MODEL as an OpenAI-compatible API (/v1/chat/completions) with the web UI at /.

    Refuses a non-loopback --host without --api-key (or EMMA_API_KEY) unless --insecure is given.
    """
    from emma.serve.security import is_loopback_host, normalise_domains

    if not is_loopback_host(host) and not api_key and not insecure:
        raise fail(
            f"refusing to listen on {host} without an API key: pass --api-key (or set EMMA_API_KEY), "
            "or --insecure to serve the network without one"
        )
    domains = normalise_domains(allowed_domain)
    if allow_remote_images and not domains:
        raise fail("--allow-remote-images needs at least one --allowed-domain")
    if domains and not allow_remote_images:
        raise fail("--allowed-domain has no effect without --allow-remote-images")

    from emma.serve.app import ServeSettings
    from emma.serve.budget import bound_allocator

    bound_allocator()  # freed image memory goes back to the system (see emma.serve.budget)

    max_body_bytes = int(max_body_mb * 1024**2)
    settings = ServeSettings(
        api_key=api_key or None,
        allow_remote_images=allow_remote_images,
        allowed_domains=domains,
        max_batch_size=max_batch_size,
        queue_capacity=queue_capacity,
        batch_wait_ms=batch_wait_ms,
        max_images=max_images,
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens,
        default_max_tokens=min(512, max_tokens),
        memory_budget_mb=memory_budget_mb,
        max_text_chars=max_text_chars,
    )
    typer.echo(f"loading {model} ...", err=True)
    engine = _engine(
        backend,
        model,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        mmproj=mmproj,
        family=family,
        max_images=max_images,
        max_model_len=max_model_len,
        backend_command=backend_command,
        backend_args=backend_arg,
        startup_timeout_s=startup_timeout_s,
    )
    # uvicorn ends on SIGTERM by raising it again once it has shut down; exiting through SystemExit
    # instead lets the engine close (a llama.cpp / vLLM server started here is stopped with it).
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _serve(engine, settings, host=host, port=port, api_key=api_key)
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _engine(
    backend: str,
    model: str,
    *,
    device: str,
    dtype: str,
    max_batch_size: int,
    mmproj: Path | None,
    family: str | None,
    max_images: int,
    max_model_len: int | None,
    backend_command: str | None,
    backend_args: list[str],
    startup_timeout_s: float,
) -> Engine:
    """The engine behind the server: in-process, an openai: peer, or a llama.cpp / vLLM server started here."""
    from emma.infer.factory import load_engine

    if backend not in BACKENDS:
        raise fail(f"--backend must be one of {', '.join(BACKENDS)}; got {backend[:20]!r}")
    if backend == "transformers":
        engine_only = (mmproj, family, max_model_len, backend_command, backend_args or None)
        if any(x is not None for x in engine_only):
            raise fail(
                "--mmproj, --family, --max-model-len, --backend-command, --backend-arg need --backend llamacpp, llama-server or vllm"
            )
        if model.strip().lower().startswith("openai:"):
            return load_engine(model)
        return load_engine(model, device=device, dtype=dtype, max_batch_size=max_batch_size)

    from emma.infer.launch import launch_engine

    typer.echo(f"starting the {backend} server ...", err=True)
    return launch_engine(
        backend,
        model,
        family=family,
        mmproj=mmproj,
        max_images=max_images if backend == "vllm" else None,
        max_model_len=max_model_len,
        command=shlex.split(backend_command) if backend_command else None,
        extra_args=backend_args,
        startup_timeout_s=startup_timeout_s,
        concurrency=max_batch_size,
    )


def _serve(engine: Engine, settings: ServeSettings, *, host: str, port: int, api_key: str | None) -> None:
    import uvicorn

    from emma.serve.app import create_app

    application = create_app(engine, settings)
    _audit_to_stderr()
    shown = f"[{host}]" if ":" in host else host
    auth = "API key required" if api_key else "no API key"
    typer.echo(
        f"EMMA serving {settings.model_name or engine.model_name} at http://{shown}:{port}/ "
        f"(OpenAI API at /v1, {auth}). Research tool, not for clinical use."
    )
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False)
