"""How every ``baklava-*`` command runs: one-line errors with their exit status, log lines on stderr.

Shared by the commands of :mod:`baklava.cli`, :mod:`baklava.serving.cli` and
:mod:`baklava.bench.cli`.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from baklava.errors import BaklavaError


def log(msg: str) -> None:
    click.echo(f"baklava: {msg}", err=True)


def entry_point(command: click.Command, prog: str):
    """Run a click command so that every expected error is one line and a non-zero exit."""

    @functools.wraps(command.callback)
    def entry(argv: list[str] | None = None) -> None:
        try:
            command.main(args=argv, prog_name=prog, standalone_mode=False)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo(f"{prog}: aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"{prog}: error: {e.format_message()}", err=True)
            sys.exit(2)
        except BaklavaError as e:
            click.echo(f"{prog}: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)

    return entry


def check_writable(out) -> None:
    """Fail before any expensive work when ``out`` cannot be created."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BaklavaError(f"cannot write {out}: {parent} is not a writable directory")
