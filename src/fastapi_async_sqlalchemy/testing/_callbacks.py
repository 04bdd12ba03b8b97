"""``capture_on_commit_callbacks()``: see what ``db.on_commit`` would run, and run it on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from .._hooks import Registered, hooks, run_now

__all__ = ["capture_on_commit_callbacks"]


@asynccontextmanager
async def capture_on_commit_callbacks(
    *, execute: bool = False
) -> AsyncIterator[list[Callable[[], Any]]]:
    """Inside the block, callbacks that ``db.on_commit`` would run after a commit are collected
    in the list it gives, in order, instead of running; those of rolled-back transactions never
    appear. With ``execute=True`` they run when the block ends without an error (callbacks they
    register run too), and the first one that fails raises its error.
    """
    callbacks: list[Callable[[], Any]] = []
    captured: list[Registered] = []

    def capture(due: list[Registered]) -> None:
        captured.extend(due)
        callbacks.extend(registered.callback for registered in due)

    previous, hooks.capture = hooks.capture, capture
    try:
        yield callbacks
    finally:
        hooks.capture = previous
    if execute:
        await run_now(captured)
