"""``emma chat``: ask questions about medical images, one-shot or as an interactive conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console
from rich.markdown import Markdown

from emma.cli import app
from emma.cli.common import err_console, handle_errors
from emma.cli.imaging import SERIES_HELP, check_series_option
from emma.errors import EmmaError, InputError
from emma.infer.chat import ChatSession, ChatTurnResult, render_boxes
from emma.infer.modes import MODES
from emma.infer.types import SamplingParams
from emma.io.atomic import atomic_path
from emma.io.image import ModelImage
from emma.io.load import VolumeSampling, load_images
from emma.io.windows import parse_window

DEFAULT_MODEL = "emma-tiny"
EXIT_WORDS = ("exit", "quit", ":q")
MAX_LINE_CHARS = 8000

INTERACTIVE_HELP = (
    "Type a question and press Enter. Commands: /image PATH (add an image for the next question), "
    "/mode chat|structured|report, exit (or end of input) to leave."
)


def _load_files(paths: list[Path], window: str | None, sampling: VolumeSampling) -> list[ModelImage]:
    images: list[ModelImage] = []
    for path in paths:
        images.extend(load_images(path, window=window, sampling=sampling))
    return images


def _write_boxes(session: ChatSession, result: ChatTurnResult, target: Path) -> None:
    picture = render_boxes(session.images, result.boxes)
    with atomic_path(target) as tmp:
        picture.save(tmp, format="PNG")


def _show(result: ChatTurnResult, console: Console, *, streamed: bool) -> None:
    if not streamed:
        console.print(result.text, markup=False, highlight=False)
    else:
        console.print()
    if result.structured is not None:
        console.print(Markdown(result.structured.to_markdown()))
    elif result.mode == "structured":
        console.print(
            "structured output could not be read: " + "; ".join(result.structured_errors[:3]),
            style="yellow",
            markup=False,
        )
    if result.report is not None and result.report.errors:
        console.print("report: " + "; ".join(result.report.errors), style="yellow", markup=False)
    for k, box in enumerate(result.boxes):
        label = f" {box.label}" if box.label else ""
        console.print(
            f"box {k} on image {box.image_index}: ({box.x1:.0f}, {box.y1:.0f}, {box.x2:.0f}, {box.y2:.0f}){label}",
            markup=False,
            highlight=False,
        )
    for message in result.box_errors:
        console.print(f"box note: {message}", style="yellow", markup=False)
    console.print(result.notice, style="dim italic", markup=False)


def _turn(
    session: ChatSession,
    question: str,
    mode: str,
    *,
    as_json: bool,
    boxes: Path | None,
    console: Console,
) -> ChatTurnResult:
    stream = console.is_terminal and not as_json
    on_delta = (lambda delta: console.print(delta, end="", markup=False, highlight=False)) if stream else None
    result = session.ask(question, mode, on_delta=on_delta)
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        _show(result, console, streamed=stream)
    if boxes is not None:
        _write_boxes(session, result, boxes)
    return result


def _interactive(
    session: ChatSession,
    mode: str,
    *,
    as_json: bool,
    boxes: Path | None,
    console: Console,
    stdin: TextIO,
) -> None:
    tty = stdin.isatty()
    if tty:
        err_console.print(INTERACTIVE_HELP, style="dim", markup=False)
    while True:
        if tty:
            err_console.print(f"[{mode}] > ", end="", markup=False)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()[:MAX_LINE_CHARS]
        if not line:
            continue
        if line.lower() in EXIT_WORDS:
            break
        try:
            if line.startswith("/image "):
                added = session.add_images(Path(line[len("/image ") :].strip()))
                err_console.print(f"{len(added)} image(s) added for the next question", markup=False)
            elif line.startswith("/mode "):
                wanted = line[len("/mode ") :].strip()
                if wanted not in MODES:
                    raise InputError(f"unknown mode {wanted!r}; expected chat, structured or report")
                mode = wanted
            else:
                _turn(session, line, mode, as_json=as_json, boxes=boxes, console=console)
        except (EmmaError, OSError, ValueError) as exc:  # one bad turn does not end the conversation
            message = str(exc) if isinstance(exc, EmmaError) else f"{type(exc).__name__}: {exc}"
            err_console.print(f"error: {message.splitlines()[0] if message else 'failed'}", markup=False)


@app.command()
@handle_errors
def chat(
    question: str | None = typer.Argument(
        None, help="Ask this and exit; without it, read questions from the input."
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m", help="Model spec: emma-tiny, a folder, a hub id, openai:URL#MODEL."
    ),
    image: list[Path] = typer.Option(
        [], "--image", "-i", help="DICOM file or series folder, NIfTI, PNG/JPEG; repeatable."
    ),
    context: str | None = typer.Option(
        None, "--context", "-c", help="Clinical context: chief complaint, vitals, triage note."
    ),
    window: str | None = typer.Option(
        None, "--window", help="CT window: preset (lung, brain, ...) or CENTER,WIDTH."
    ),
    mode: str = typer.Option(
        "chat", "--mode", help="chat, structured (diagnostic JSON) or report (findings/impression)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer on stdout."),
    boxes: Path | None = typer.Option(
        None, "--boxes", help="Write a PNG of all images side by side (in order) with the answer's boxes."
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, max=8192, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0, help="0 = greedy."),
    slices: int = typer.Option(8, "--slices", min=1, max=64, help="Volumes: number of slices to show."),
    series: int | None = typer.Option(None, "--series", min=1, help=SERIES_HELP),
    family: str | None = typer.Option(
        None, "--family", help="openai: models: the model family, for box conventions."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N (in-process models)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16, fp16 (in-process models)."),
) -> None:
    """Chat with a model about medical images (research use only, not for clinical decisions).

    With QUESTION: one answer, then exit. Without it: one question per input line until end of input or
    'exit'; '/image PATH' adds an image, '/mode MODE' switches mode. On a terminal the answer streams.
    --boxes writes one PNG with every image of the conversation left to right and the latest answer's
    boxes drawn on them (rewritten after each answer).
    """
    if mode not in MODES:
        raise InputError(f"--mode must be chat, structured or report, not {mode!r}")
    if window:
        parse_window(window)  # a bad window is reported before anything is loaded
    is_openai = model.strip().lower().startswith("openai:")
    if family is not None and not is_openai:
        raise InputError("--family applies to openai: models only (in-process models know their family)")
    if boxes is not None and question is not None and not image:
        raise InputError("--boxes needs at least one --image")
    check_series_option(series, image)
    sampling = VolumeSampling(n=slices, series=series)
    preloaded = _load_files(image, window, sampling)  # bad images fail before the model loads

    from emma.infer.factory import load_engine

    options: dict[str, object] = {"family": family} if is_openai else {"device": device, "dtype": dtype}
    engine = load_engine(model, **options)
    session = ChatSession(
        engine,
        context=context,
        window=window,
        sampling=SamplingParams(max_new_tokens=max_tokens, temperature=temperature),
        volume_sampling=sampling,
    )
    if preloaded:
        session.add_images(preloaded)
    console = Console(highlight=False, soft_wrap=True)
    if question is not None:
        _turn(session, question, mode, as_json=as_json, boxes=boxes, console=console)
        return
    _interactive(session, mode, as_json=as_json, boxes=boxes, console=console, stdin=sys.stdin)
