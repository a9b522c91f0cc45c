"""Shared plumbing of the three commands: one-line errors with exit code 2, ``--debug`` for tracebacks."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

import click

from featstore.errors import UserError


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device; free some space and run the same command again (finished chunks are kept)"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or exc.__class__.__name__}{where}"
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


def run_cli(group: click.Group, prog_name: str) -> None:
    """Run a click group; user errors become one line on stderr and exit code 2.

    ``--debug`` anywhere on the command line (or FEATSTORE_DEBUG=1) shows the traceback instead.
    """
    args = sys.argv[1:]
    debug = "--debug" in args or os.environ.get("FEATSTORE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        group.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # click's own usage errors already are one clear line; keep click's exit code 2.
        click.echo(f"{prog_name}: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (UserError, OSError) as exc:
        if debug:
            raise
        click.echo(f"{prog_name}: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"{prog_name}: interrupted", err=True)
        sys.exit(130)


def main_entry(group: click.Group, prog_name: str) -> Callable[[], None]:
    def main() -> None:
        run_cli(group, prog_name)

    return main
