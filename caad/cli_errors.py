"""How a ``caad`` command reports an expected error: one line ``caad <command>: error: ...``, exit status 2.

Every subcommand's handler runs inside :func:`run_handler`. Expected errors — a :class:`CLIError` (raise it for a
bad option, a missing input, an unloadable checkpoint ...), a bad record (:class:`caad.data.RecordError`), a
missing optional package, an OS error on a named file (missing, unreadable, read-only output, full disk) — print
one line that names the file/record/option and exit with status 2; any other exception is a bug and keeps its
traceback. ``--debug`` shows the traceback of expected errors too.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

EXIT_ERROR = 2  # argparse's status for a usage error: one status for every error the user can fix
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error the user can fix (bad option value, missing file, mismatched resume ...).

    The message is printed as ``caad <command>: error: <message>``; it should name the option, file or record
    and say what to do.
    """


def expected_error_message(exc: BaseException) -> str | None:
    """The one-line message for an expected error, or None when ``exc`` is a bug (keep the traceback)."""
    from .data import MissingDependencyError, RecordError  # caad.data imports only NumPy

    if isinstance(exc, (CLIError, RecordError, MissingDependencyError)):
        return str(exc)
    if isinstance(exc, OSError):
        # open()/os.* name the file; the strerror ("Permission denied", "No space left on device") says why
        name = exc.filename if exc.filename is not None else None
        reason = exc.strerror or str(exc)
        return f"{name}: {reason}" if name is not None else reason
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: {exc}"
    return None


def _one_line(message: str) -> str:
    message = re.sub(r"^caad[\w -]*: (error: )?", "", message.strip())  # handlers that already prefixed it
    return " ".join(message.split())


def run_handler(command: str, handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace,
                *, debug: bool = False) -> int:
    """Run ``handler(args)``; expected errors become one line on stderr and exit status 2 (see the module doc).

    ``SystemExit("message")`` raised by a handler is treated like a :class:`CLIError`.
    """
    try:
        status = handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"caad {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if debug or not isinstance(exc.code, str):
            raise
        message = exc.code
    except Exception as exc:
        found = expected_error_message(exc)
        if found is None or debug:
            raise
        message = found
    else:
        return 0 if status is None else int(status)
    print(f"caad {command}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_ERROR
