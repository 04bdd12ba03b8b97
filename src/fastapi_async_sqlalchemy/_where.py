"""The line of user code that sent a statement, across SQLAlchemy's greenlet.

Async engines run statements in a greenlet whose own stack ends inside SQLAlchemy: the caller is
found by walking on into the parent greenlet's frames, where the awaiting coroutine is
suspended. Used by the testing kit's query assertions and by the observability warnings.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType

import greenlet

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_NOT_USER_CODE = tuple(
    {
        _PACKAGE,
        sysconfig.get_paths()["stdlib"] + os.sep,
        sysconfig.get_paths()["purelib"] + os.sep,
        sysconfig.get_paths()["platlib"] + os.sep,
    }
)


def caller() -> str:
    """``path:line`` of the first frame of user code above here, or ``"unknown"``."""
    frame: FrameType | None = sys._getframe(1)
    current: greenlet.greenlet | None = greenlet.getcurrent()
    while current is not None:
        while frame is not None:
            filename = frame.f_code.co_filename
            # "<...>": frozen modules, and the wrappers SQLAlchemy generates at run time.
            if not filename.startswith(_NOT_USER_CODE) and not filename.startswith("<"):
                return f"{os.path.relpath(filename)}:{frame.f_lineno}"
            frame = frame.f_back
        current = current.parent
        frame = current.gr_frame if current is not None else None
    return "unknown"
