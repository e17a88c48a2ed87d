"""The errors users see, and the path helper every input check starts with. Imports nothing heavy (no torch, PIL or
numpy), so any module can raise them without loading what it does not use.

str(e) of each is ONE clear line: the CLI prints it and exits 2, the server answers it as the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InputError", "NonFiniteVideo", "CheckpointError", "user_path", "first_line"]


class InputError(ValueError):
    """A user-facing problem with an input; str(e) is ONE clear line (the CLI prints it and exits 2)."""


class NonFiniteVideo(ValueError):
    """The model's output is not a video: NaN frames, which would be written as black ones (the weights or float16
    overflow, not the request: the server answers 500, without a traceback). One line, as InputError's."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used as it is: one line naming the file or the tensors and what to do."""


def user_path(path: str | os.PathLike) -> Path:
    """Path(path) with a leading ~ or ~user expanded; a user that does not exist is a one-line InputError (pathlib
    raises RuntimeError, which front ends would report as a failure of their own)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise InputError(f"{path}: {str(path).split('/')[0]} names no user's home folder on this machine") from None


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first non-blank line, or its type's name when it has none (a bare
    `str(e).splitlines()[0]` raises IndexError on an empty message, turning one error into another)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
