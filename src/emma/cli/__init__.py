"""The ``emma`` command: one typer app; each area registers its commands from its own module."""

from __future__ import annotations

import typer

from emma import __version__

app = typer.Typer(
    name="emma",
    help="EMMA: Emergency Medicine Multimodal Assistant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _register() -> None:
    # Imported here so each module can `from emma.cli import app` without a cycle.
    from emma.cli import annotate, chat, data, deid, demo, eval, export, imaging, serve, suite, synth, train  # noqa: F401


_register()
