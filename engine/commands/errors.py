"""The CLI's one error policy: what is the user's fault, what is a bug, and Ctrl-C.

A user error (an `engine.errors.XentError`, a click usage error, or an OSError naming a
file: missing, unreadable, a directory) ends in one line ``Error: <file>: <what, where>``
and status 2. Anything else is a bug in xent: one line ``Internal error: ...`` and status 1,
the traceback only with ``--debug`` or ``XENT_DEBUG=1``. Ctrl-C exits 130 with
``Interrupted``.
"""

from __future__ import annotations

import contextlib
import os

import click

from engine import interrupt
from engine.errors import XentError

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class XentCliError(click.ClickException):
    """A user error, shown as one line ``Error: <message>`` with status 2."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str):
        super().__init__(one_line(message))


class XentInternalError(click.ClickException):
    """An exception no user can cause: one line naming it a bug, status 1."""

    exit_code = EXIT_INTERNAL_ERROR

    def __init__(self, err: BaseException):
        text = one_line(str(err))
        what = f"{type(err).__name__}: {text}" if text else type(err).__name__
        super().__init__(
            f"Internal error: {what} — this is a bug in xent; run again with --debug "
            "(or XENT_DEBUG=1) for the traceback"
        )

    def show(self, file=None) -> None:
        click.echo(self.message, err=True)


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def is_user_error(err: BaseException) -> bool:
    """Errors a user causes: xent's own types, and a file the system refuses by name.

    A bare ValueError/TypeError/IndexError (from numpy, say) or an Arrow error the io
    layer did not wrap is a bug, not a user error.
    """
    if isinstance(err, XentError):
        return True
    return isinstance(err, OSError) and bool(err.filename)


def describe_error(err: BaseException) -> str:
    """The message of a user error: ``<file>: <what>`` where a file is known."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return one_line(str(err)) or type(err).__name__


def debugging(ctx: click.Context | None) -> bool:
    """``--debug`` given on any level of the command line, or XENT_DEBUG set."""
    if os.environ.get("XENT_DEBUG", "") not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.meta.get("xent.debug"))


@contextlib.contextmanager
def handle_errors(ctx: click.Context):
    """Turn user errors, bugs and Ctrl-C into one line and an exit status (the one place)."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as e:
        if debugging(ctx):
            raise
        where = e.ctx.command_path if e.ctx is not None else ctx.command_path
        raise XentCliError(f"{one_line(e.format_message())} (see '{where} --help')") from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        if debugging(ctx):
            raise
        interrupted()
    except BrokenPipeError:
        raise  # `xent ... | head`: click ends quietly
    except Exception as e:
        if interrupt.requested() and not debugging(ctx):
            interrupted()  # an error in the interrupt's wake (see engine/interrupt.py)
        if debugging(ctx):
            raise
        if is_user_error(e):
            raise XentCliError(describe_error(e)) from None
        raise XentInternalError(e) from None


def interrupted():
    click.echo("Interrupted", err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["xent.debug"] = True
    return value


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="Show the full traceback of an error.",
)
