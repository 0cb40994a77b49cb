"""The command line (entry point `vramplan = "vramplan.cli:main"`): options generated from the
options table (cli.options), commands (cli.commands, cli.plots), rendering (cli.render)."""

from __future__ import annotations

import sys

from vramplan.cli.commands import app
from vramplan.cli.plots import plot_app
from vramplan.cli.render import error_line
from vramplan.errors import VramplanError

app.add_typer(plot_app, name="plot")


def main() -> None:
    try:
        app()
    except VramplanError as e:  # library errors raised outside a command's own handling
        error_line(e)
        sys.exit(2)


__all__ = ["app", "main"]
