"""Dataset commands: ``emma data import|stats|check``."""

from __future__ import annotations

import typer

from emma.cli import app

data_app = typer.Typer(help="Canonical datasets: import, statistics, leakage checks.", no_args_is_help=True)
app.add_typer(data_app, name="data")
