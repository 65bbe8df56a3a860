"""``emma demo``: EMMA's main job end to end, offline, on a real chest radiograph.

The demo model (``--model``, default the embedded ``emma-tiny``) answers one question in chat mode and
one in structured mode about a real chest radiograph that an installed package carries (pydicom-data's
``RG1_UNCI.dcm``; pydicom's own ``CT_small.dcm`` CT slice when pydicom-data is absent, with a message).
Each answer goes through exactly what ``emma chat --boxes`` does (the same turn, printing and overlay
code): the answer, the structured findings, the boxes and the not-for-clinical-use notice, with one box
overlay PNG per answer under ``--out``. Then the same model, already loaded, is served as ``emma serve``
serves it (the same app, settings defaults and audit log; web UI included) on
http://127.0.0.1:PORT until Ctrl+C, unless ``--no-serve`` is given.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from emma.cli import app
from emma.cli.common import handle_errors
from emma.errors import InputError
from emma.infer.engine import Engine
from emma.infer.prompts import NOTICE

DEFAULT_MODEL = "emma-tiny"
DEFAULT_OUT = "out/demo"
DEFAULT_PORT = 8000
HOST = "127.0.0.1"
MAX_BATCH_SIZE = 8  # emma serve's default: the engine is loaded once and then served as emma serve would


@dataclass(frozen=True)
class DemoImage:
    """The image the demo asks about, where it comes from and the questions that suit it."""

    path: Path
    description: str
    chat_question: str
    structured_question: str


def find_demo_image() -> tuple[DemoImage, str | None]:
    """The demo image and, when the chest radiograph is missing, a message saying what replaced it.

    Only files of installed packages are used (``download=False``): the demo never reaches the network.
    """
    from pydicom.data import get_testdata_file

    radiograph = get_testdata_file("RG1_UNCI.dcm", download=False)
    if radiograph is not None:
        return (
            DemoImage(
                Path(str(radiograph)),
                "chest radiograph (CR, 16-bit) RG1_UNCI.dcm from the pydicom-data package",
                "Is there a pneumothorax?",
                "Assess this chest radiograph for acute findings.",
            ),
            None,
        )
    ct = get_testdata_file("CT_small.dcm", download=False)
    if ct is None:
        raise InputError(
            "no demo image: neither pydicom-data's RG1_UNCI.dcm nor pydicom's CT_small.dcm is installed; "
            "run 'make install'"
        )
    return (
        DemoImage(
            Path(str(ct)),
            "CT slice CT_small.dcm from the pydicom package",
            "What organ is shown in this image?",
            "Assess this CT slice for acute findings.",
        ),
        (
            "pydicom-data's chest radiograph RG1_UNCI.dcm is not installed ('make install' adds it): "
            "using pydicom's own CT_small.dcm, a real CT slice, instead"
        ),
    )


def _bind(port: int) -> socket.socket:
    """The server's listening socket, bound now so that a busy port fails before the model loads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise InputError(f"port {port} on {HOST} is in use: pass another --port, or --no-serve") from None
    return sock


def _serve(engine: Engine, sock: socket.socket, port: int, console: Console) -> None:
    """Serve ``engine`` as ``emma serve`` does (same app and defaults, web UI at /) until Ctrl+C."""
    import uvicorn

    from emma.cli.serve import _audit_to_stderr
    from emma.serve.app import ServeSettings, create_app

    settings = ServeSettings()
    application = create_app(engine, settings)
    _audit_to_stderr()
    auth = "API key required (EMMA_API_KEY)" if settings.api_key else "no API key"
    console.rule("web UI")
    console.print(
        f"EMMA serving {settings.model_name or engine.model_name} at http://{HOST}:{port}/ "
        f"(web UI; OpenAI API at /v1, {auth}). Press Ctrl+C to stop.",
        markup=False,
    )
    console.print(NOTICE, style="dim italic", markup=False)
    server = uvicorn.Server(
        uvicorn.Config(application, host=HOST, port=port, log_level="warning", access_log=False)
    )
    server.run(sockets=[sock])


@app.command()
@handle_errors
def demo(
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m", help="Model spec: emma-tiny, a folder, a hub id, openai:URL#MODEL."
    ),
    question: str | None = typer.Option(
        None, "--question", "-q", help="The chat-mode question (default: one that suits the image)."
    ),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the box overlay PNGs."),
    port: int = typer.Option(
        DEFAULT_PORT, "--port", min=1, max=65535, help="Port of the server on 127.0.0.1."
    ),
    no_serve: bool = typer.Option(
        False, "--no-serve", help="Stop after the answers; do not start the server."
    ),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, max=8192, help="Longest answer, in tokens."),
) -> None:
    """Run EMMA's main job offline: answers about a real chest radiograph, then the server with its web UI.

    Asks MODEL one question in chat mode and one in structured mode (as 'emma chat --boxes' does, each on
    its own), prints the answers, the structured findings and where each box overlay PNG was written, then
    serves the same model as 'emma serve' does on http://127.0.0.1:PORT/ (web UI) until Ctrl+C.
    Research tool, not for clinical use.
    """
    from emma.cli.chat import _turn
    from emma.infer.chat import ChatSession
    from emma.infer.types import SamplingParams
    from emma.io.load import load_images

    console = Console(highlight=False, soft_wrap=True)
    sock = None if no_serve else _bind(port)
    try:
        console.rule("EMMA demo")
        console.print(NOTICE, style="dim italic", markup=False)
        image, fallback = find_demo_image()
        if fallback is not None:
            console.print(fallback, style="yellow", markup=False)
        loaded = load_images(image.path)  # a bad image fails before the model loads
        console.print(
            f"image: {image.description}, {loaded[0].width} x {loaded[0].height} pixels", markup=False
        )
        console.print(f"model: {model}", markup=False)

        from emma.infer.factory import load_engine

        started = time.perf_counter()
        with console.status(f"loading {model} ...", spinner="dots"):
            if model.strip().lower().startswith("openai:"):
                engine = load_engine(model)
            else:
                engine = load_engine(model, max_batch_size=MAX_BATCH_SIZE)
        console.print(f"loaded {engine.model_name} in {time.perf_counter() - started:.1f} s", markup=False)

        sampling = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        asks = (("chat", question or image.chat_question), ("structured", image.structured_question))
        for mode, text in asks:
            console.rule(f"{mode} mode")
            console.print(f"Q: {text}", style="bold", markup=False)
            session = ChatSession(engine, sampling=sampling)
            session.add_images(loaded)
            target = out / f"{mode}_boxes.png"
            result = _turn(session, text, mode, as_json=False, boxes=target, console=console)
            console.print(f"box overlay ({len(result.boxes)} box(es)) written to {target}", markup=False)

        if sock is None:
            console.rule()
            console.print("done (--no-serve: the server was not started)", markup=False)
            return
        _serve(engine, sock, port, console)
    finally:
        if sock is not None:
            sock.close()
