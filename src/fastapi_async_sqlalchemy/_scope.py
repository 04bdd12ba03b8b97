"""A session scope: where its session is created, and how that session is finalized.

A scope (a request, a websocket connection, an ``async with db():`` block) creates its session
lazily, in :meth:`Scope.open`, the first time ``db.session`` is read inside it. When the scope
ends, :func:`finalize` commits or rolls back and closes that session. These are the only two
places where a scope's session begins and ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import warnings
import weakref
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin

from ._hooks import hooks, settle
from .exceptions import SessionFinalizedError

try:  # SQLAlchemy >= 2.0.22: a closed session can be made unusable for good.
    from sqlalchemy.orm.session import _SessionCloseState

    _CLOSE_IS_RESET: object = _SessionCloseState.CLOSE_IS_RESET
    _CLOSED: object = _SessionCloseState.CLOSED
except ImportError:  # pragma: no cover - older SQLAlchemy keeps reusable sessions
    _CLOSE_IS_RESET = _CLOSED = None

T = TypeVar("T")

# 0.8's logger name, so logging set up for 0.8 still sees every record of ours.
logger = logging.getLogger("fastapi_async_sqlalchemy.middleware")

SessionFactory = Callable[[], AsyncSession]


class Scope:
    """One lazily opened session and the reason it can no longer be opened, once ended.

    ``session`` is read on every ``db.session`` access, so it is a plain slot: the proxy returns
    it when set and calls :meth:`open` otherwise.
    """

    __slots__ = ("ended", "factory", "session")

    def __init__(self, factory: SessionFactory) -> None:
        self.session: AsyncSession | None = None
        self.factory = factory
        self.ended: str | None = None  # the message for SessionFinalizedError, once ended

    def open(self) -> AsyncSession:
        """Create the scope's session, unless the scope has ended."""
        if self.ended is not None:
            raise SessionFinalizedError(self.ended)
        session = self.session = self.factory()
        return session

    def end(self, reason: str) -> AsyncSession | None:
        """Close the scope to new sessions and hand back the session to finalize, if any."""
        session, self.session, self.ended = self.session, None, reason
        return session


def owner_holds_transaction(session: AsyncSession) -> bool:
    """True while a transaction begun explicitly (``session.begin()``) is still open.

    Such a transaction belongs to the code that began it (say a FastAPI ``yield`` dependency
    that commits in its teardown): the middleware must neither commit nor roll it back. One
    that ``begin_nested()`` began around its savepoint is the scope's, as in 0.8.
    """
    transaction = session.sync_session.get_transaction()
    return (
        transaction is not None
        and transaction.origin is SessionTransactionOrigin.BEGIN
        and transaction.is_active
        and transaction not in _savepoint_roots
    )


# Transactions that SQLAlchemy marks as begun explicitly although begin_nested() began them,
# around its savepoint, on a session that had none.
_savepoint_roots: weakref.WeakSet[SessionTransaction] = weakref.WeakSet()
_BEGIN = Session.begin.__code__


def watch_savepoint_roots() -> None:
    """Tell the transactions begin_nested() begins from those begin() does (once a process)."""
    if not event.contains(Session, "after_transaction_create", _transaction_created):
        event.listen(Session, "after_transaction_create", _transaction_created)


def _transaction_created(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None or transaction.origin is not SessionTransactionOrigin.BEGIN:
        return
    frame: FrameType | None = sys._getframe(1)
    for _ in range(8):  # up through SQLAlchemy's event dispatch to Session.begin()
        if frame is None:
            return
        if frame.f_code is _BEGIN:
            if frame.f_locals.get("nested"):
                _savepoint_roots.add(transaction)
            return
        frame = frame.f_back


async def finalize(
    session: AsyncSession, *, commit: bool, raise_callback_errors: bool = False
) -> None:
    """Commit (when asked) or roll back, then close for good.

    A failed commit propagates after the session is rolled back and closed (a failure of that
    close is reported beside it, never in its place). The rollback and the close run to
    completion even when the caller is cancelled, so a cancelled request never keeps its
    connection checked out. Errors of ``on_commit`` callbacks are then raised as a
    ``CommitCallbackError`` (``raise_callback_errors``) or logged.
    """
    if commit:
        try:
            # Once begun, the commit and the connection's return to the pool run to their end.
            await run_to_completion(session.commit())
        except BaseException as failed:
            await finalize_after(session, failed)
            raise
    await _close(session)
    if hooks.enabled:
        settle(session, raise_errors=raise_callback_errors)


async def finalize_after(session: AsyncSession, primary: BaseException) -> None:
    """Roll back and close ``session`` while ``primary`` is propagating: the first error wins.

    A failure of the rollback or the close is reported beside ``primary`` (see
    :func:`report_cleanup_error`) and never replaces it, so ``except ValueError`` around the
    block still catches the caller's own ``ValueError``.
    """
    try:
        await _close(session)
    except Exception as error:
        report_cleanup_error(error, primary)
    if hooks.enabled:
        settle(session, raise_errors=False)


def report_cleanup_error(error: BaseException, primary: BaseException) -> None:
    """Tell about a cleanup that failed while ``primary`` propagates: a log record with the
    cleanup's traceback and a ``UserWarning`` (as 0.8 warned), never an exception."""
    logger.error(
        "Cleaning up a database session failed while %s was already being raised; the "
        "original error propagates and this one is only reported.",
        type(primary).__name__,
        exc_info=error,
    )
    # Warnings escalated to errors must not replace the original error either.
    with contextlib.suppress(Warning):
        warnings.warn(
            "A database session cleanup error was suppressed because another exception is "
            f"already being raised: {type(error).__name__}: {error}",
            UserWarning,
            stacklevel=2,
        )


async def _close(session: AsyncSession) -> None:
    sync_session = session.sync_session
    if sync_session.get_transaction() is None:
        # Nothing to release, so nothing a cancellation could cut short: bookkeeping only.
        sync_session.close()
    else:
        await run_to_completion(session.close())
    if _CLOSED is not None and getattr(sync_session, "_close_state", None) is _CLOSE_IS_RESET:
        # Terminal: a reference kept past the scope raises instead of quietly checking out a
        # connection that nobody would ever return.
        sync_session._close_state = _CLOSED  # type: ignore[assignment]


_EAGER = sys.version_info >= (3, 12)  # Task(..., eager_start=True) exists


# The code of the callback by which an expiring asyncio.timeout() cancels its task.
_ON_TIMEOUT: object = getattr(asyncio.timeouts.Timeout, "_on_timeout").__code__  # noqa: B009


def _cancelled_by_own_timeout(task: asyncio.Task[Any]) -> bool:
    """Whether ``task.cancel()`` was called by an ``asyncio.timeout()`` entered in ``task``.

    Such a cancellation is the cleanup's own: SQLAlchemy bounds its wait for a pool connection
    (a commit that flushes may need one) with ``asyncio.wait_for()``, which on Python 3.12+
    cancels the current task when time runs out. Refusing it would make that wait endless.
    Called from a ``cancel()`` override: frame 2 is whoever called ``cancel()``.
    """
    frame = sys._getframe(2)
    if frame.f_code is not _ON_TIMEOUT:
        return False
    return getattr(frame.f_locals.get("self"), "_task", None) is task


class _Cleanup(asyncio.Task[T]):
    """A task that refuses to be cancelled, but by a timeout of its own.

    Awaiting it passes on no cancellation: asyncio holds the awaiting task's cancellation back
    and delivers it once this task is done, so the cleanup always finishes first.
    """

    def cancel(self, msg: Any | None = None) -> bool:
        if _cancelled_by_own_timeout(self):
            return super().cancel(msg)
        return False


class GuardedTask(asyncio.Task[T]):
    """A task that holds back its own cancellation while it cleans up.

    Between :meth:`guard` and :meth:`unguard`, ``cancel()`` is recorded instead of delivered, and
    :meth:`unguard` (called by the task's own coroutine) raises it; a timeout that the guarded
    code entered itself still fires. Inside the guard,
    :func:`run_to_completion` awaits its work directly: the task is its own shield, which saves
    the cleanup task and its trip through the event loop (about 15 µs for a close that waits on
    the database). ``db.gather()`` runs each coroutine in one of these.
    """

    guarded = False
    _held: tuple[Any, ...] | None = None  # CancelledError's arguments, for a cancel held back

    def cancel(self, msg: Any | None = None) -> bool:
        if self.guarded and not _cancelled_by_own_timeout(self):
            if self.done():
                return False
            self._held = () if msg is None else (msg,)
            return True
        return super().cancel(msg)

    def guard(self) -> None:
        """Hold back cancellations from now on, unless one is already requested.

        A cancellation requested earlier (say while the task ran, with nothing to interrupt)
        would land at the guarded code's first ``await``: then the guard stays off, and
        :func:`run_to_completion` shields the cleanup with a task of its own.
        """
        if self.cancelling() == 0:
            self.guarded = True

    def unguard(self) -> None:
        """End the guard; a cancellation held back meanwhile is raised here, in the task."""
        self.guarded = False
        held, self._held = self._held, None
        if held is not None:
            raise asyncio.CancelledError(*held)


async def run_to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile.

    A cancellation of the caller is held back until ``work`` is done and then raised, so cleanup
    is never cut short and cancellation is never lost. On Python 3.12+ the work starts at once
    and, when it never suspends, costs no trip through the event loop.
    """
    current = asyncio.current_task()
    if type(current) is GuardedTask and current.guarded:
        return await work  # the caller holds its cancellations back itself
    task = start_cleanup(work)
    if task.done():
        return task.result()
    try:
        return await task
    except asyncio.CancelledError as cancelled:
        # The caller was cancelled while the work ran; the work itself is finished.
        if not task.cancelled() and task.exception() is not None:
            raise cancelled from task.exception()
        raise


def start_cleanup(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``work`` in a task that only a timeout of its own can cancel.

    On Python 3.12+ the task starts at once and, when ``work`` never suspends, is done before
    this returns, without a trip through the event loop.
    """
    loop = asyncio.get_running_loop()
    if _EAGER:
        return _Cleanup(work, loop=loop, eager_start=True)  # type: ignore[call-arg]
    return _Cleanup(work, loop=loop)
