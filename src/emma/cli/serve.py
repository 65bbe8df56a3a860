"""``emma serve``: the OpenAI-compatible server and web UI under uvicorn."""

from __future__ import annotations

import logging
import sys

import typer

from emma.cli import app
from emma.cli.common import fail, handle_errors

DEFAULT_MODEL = "emma-tiny"


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

    import uvicorn

    from emma.infer.factory import load_engine
    from emma.serve.app import ServeSettings, create_app
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
    if model.strip().lower().startswith("openai:"):
        engine = load_engine(model)
    else:
        engine = load_engine(model, device=device, dtype=dtype, max_batch_size=max_batch_size)
    application = create_app(engine, settings)
    _audit_to_stderr()
    shown = f"[{host}]" if ":" in host else host
    auth = "API key required" if api_key else "no API key"
    typer.echo(
        f"EMMA serving {settings.model_name or engine.model_name} at http://{shown}:{port}/ "
        f"(OpenAI API at /v1, {auth}). Research tool, not for clinical use."
    )
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False)
