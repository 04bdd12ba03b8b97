"""Transaction hooks: ``db.on_commit(callback)`` runs ``callback`` once its data is committed.

Nothing here runs until the first ``on_commit()`` call: then two listeners are added, once for
the process, to SQLAlchemy's ``Session`` class (so to every session class), and each session
keeps its own callbacks in ``session.info``, keyed by the transaction they belong to:

- registered inside a savepoint, they move to its parent when it is released (SQLAlchemy's
  ``after_commit`` also fires then: that is not a commit of the data) and are dropped when it is
  rolled back;
- registered where the session has no transaction yet, they belong to its next one;
- when the root transaction commits they run, in the order they were registered, right there
  (before ``commit()`` returns, so before any response starts); when it ends any other way they
  are dropped.

A callback runs with no session of its proxy current: one that needs the database opens
``async with db():``. Its errors never turn committed data into a failure: they are kept on the
session, and the scope that finalizes it logs them (a request) or raises them
(``async with db():``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ._greenlet import await_
from .exceptions import CommitCallbackError

logger = logging.getLogger("fastapi_async_sqlalchemy")

Callback = Callable[[], Any]

# session.info keys: callbacks by transaction (None: the session's next transaction), and the
# errors of callbacks that ran, until the scope finalizing the session reports them.
_PENDING = "fastapi_async_sqlalchemy.on_commit"
_ERRORS = "fastapi_async_sqlalchemy.on_commit_errors"


class _Hooks:
    """Whether any callback was ever registered: until then nothing here costs anything.

    ``capture``, set by the testing kit's ``capture_on_commit_callbacks()``, takes the callbacks
    due after a commit instead of running them.
    """

    enabled = False
    capture: Callable[[list[Registered]], None] | None = None


hooks = _Hooks()


class Registered:
    """One callback, how its failure is handled, and whose scope it must run outside of."""

    __slots__ = ("callback", "robust", "var")

    def __init__(self, callback: Callback, robust: bool, var: ContextVar[Any]) -> None:
        self.callback = callback
        self.robust = robust
        self.var = var


def check_callback(callback: object) -> None:
    if not callable(callback):
        raise TypeError(
            f"on_commit() takes a callable with no arguments, not {type(callback).__name__}: "
            "pass `send_mail`, or `lambda: send_mail(user)`, rather than `send_mail(user)`."
        )


def register(session: AsyncSession, callback: Callback, robust: bool, var: ContextVar[Any]) -> None:
    """Bind ``callback`` to the innermost transaction of ``session`` (or to its next one)."""
    if not hooks.enabled:
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        hooks.enabled = True
    sync_session = session.sync_session
    # An inactive one (a failed flush) can only end in a rollback, which drops the callback.
    transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
    pending: dict[SessionTransaction | None, list[Registered]] = sync_session.info.setdefault(
        _PENDING, {}
    )
    pending.setdefault(transaction, []).append(Registered(callback, robust, var))


def _after_commit(session: Session) -> None:
    pending = session.info.get(_PENDING)
    if not pending:
        return
    nested = session.get_nested_transaction()
    if nested is not None:
        # A savepoint released: its callbacks now wait for the transaction around it.
        moved = pending.pop(nested, None)
        if moved:
            pending.setdefault(nested.parent, []).extend(moved)
        return
    due = [*pending.pop(None, ()), *pending.pop(session.get_transaction(), ())]
    if due:
        if hooks.capture is not None:
            hooks.capture(due)
        else:
            await_(_run(session, due))


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    pending = session.info.get(_PENDING)
    if not pending:
        return
    # Whatever is still bound to a transaction that ended was not committed: dropped.
    pending.pop(transaction, None)
    if transaction.parent is None:
        pending.clear()


# The callbacks being run here, while they run: one registered by a callback joins them.
running: ContextVar[list[Registered] | None] = ContextVar(
    "fastapi_async_sqlalchemy.on_commit_running", default=None
)


async def _run(session: Session, due: list[Registered]) -> None:
    """Run the callbacks in order; a failure stops the rest unless it was ``robust``.

    ``due`` may grow while it runs: callbacks registered by a callback run after it.
    """

    def failed(registered: Registered, error: Exception) -> bool:
        session.info.setdefault(_ERRORS, []).append(error)
        return not registered.robust

    await _run_each(due, failed)


async def run_now(due: list[Registered]) -> None:
    """Run captured callbacks in order, as after a commit, but let the first error propagate
    (the testing kit's ``capture_on_commit_callbacks(execute=True)``)."""
    await _run_each(due, None)


async def _run_each(
    due: list[Registered], failed: Callable[[Registered, Exception], bool] | None
) -> None:
    """Run ``due`` in order, each with no session of its proxy current; ``failed`` keeps an
    error and says whether to stop (without it, the error propagates)."""
    running_token = running.set(due)
    try:
        index = 0
        while index < len(due):
            registered = due[index]
            index += 1
            token = registered.var.set(None)  # no session of the proxy is current here
            try:
                result = registered.callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                if failed is None:
                    raise
                if failed(registered, exc):
                    return
            finally:
                registered.var.reset(token)
    finally:
        running.reset(running_token)


def settle(session: AsyncSession, *, raise_errors: bool) -> None:
    """The session is finalized: drop callbacks still waiting (a session closed before any
    transaction began has one) and report what the callbacks raised, raised
    (``async with db():``) or logged."""
    info = session.sync_session.info
    info.pop(_PENDING, None)
    errors: list[Exception] | None = info.pop(_ERRORS, None)
    if not errors:
        return
    if raise_errors:
        raise CommitCallbackError(errors) from errors[0]
    for error in errors:
        logger.error(
            "An on_commit callback failed after its data was committed; the data stays "
            "committed and the response is unchanged.",
            exc_info=error,
        )
