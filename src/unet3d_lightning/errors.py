"""The project's user-facing error type, and how its message is printed."""

import re
from pathlib import Path

# ANSI/VT100 escape sequences (colours, cursor moves) that a library or a progress bar may put into a message.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(message: str) -> str:
    """``message`` as one printable line: terminal escape sequences dropped, lines joined with a space, other
    control characters shown escaped (``\\x07``) so that a file name holding one stays recognisable."""
    text = _ESCAPE_SEQUENCE.sub("", str(message))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class ConfigurationError(ValueError):
    """A mistake in the user's configuration or input data, with a one-sentence message saying what to change.

    The ``unet3d`` command prints these as a single ``error:`` line (no traceback) and exits with status 2.
    """


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent: what decides whether a directory that is
    still to be created can be (a file there, or no write permission, makes the error message)."""
    existing = path
    while existing != existing.parent:
        try:
            if existing.exists():
                break
        except OSError:  # ENAMETOOLONG and the like: a name that cannot be looked up cannot exist
            pass
        existing = existing.parent
    return existing
