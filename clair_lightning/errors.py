"""How a command reports a user's mistake: one line naming the problem (exit code 2).

Shared by every command (``clair``, ``clair compare``, ``clair flower``), so that no command
module imports another.
"""

from __future__ import annotations

import argparse
import re

# Errors of the user's settings, data or files; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, argparse.ArgumentError)


def one_line(error: BaseException) -> str:
    """The root cause of a (possibly wrapped) error, on one line, with the option it concerns.

    jsonargparse wraps an error raised while instantiating a class in several layers
    ("Does not validate against any of the Union subtypes ..."); the innermost error is ours.
    """
    cause = error
    while True:
        inner = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        if inner is None or not isinstance(inner, Exception):
            break
        cause = inner
    text = " ".join(str(cause).split()) or type(cause).__name__
    key = re.match(r'Parser key "([^"]+)"', str(error))
    if key and key.group(1) not in text:
        text = f"{key.group(1)}: {text}"
    return text
