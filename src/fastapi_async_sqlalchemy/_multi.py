"""Multi-session scopes: one session per task, optional slots and connection deadlines.

Inside ``async with db(multi_sessions=True):`` each task that reads ``db.session`` gets a session
of its own (a single ``AsyncSession`` must never be used by two tasks at once). Work run through
``db.gather()`` or ``db.connection()`` is finalized in its own task, so awaiting it means it is
committed (or rolled back) and closed. A session a task took straight from ``db.session`` is
finalized as soon as that task is done, so its connection goes back to the pool at once. When
the block ends, tasks still at work or still waiting for a slot are cancelled, and the user is
told.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

from sqlalchemy.exc import TimeoutError as SQLAlchemyPoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._pool import pool_status
from ._scope import (
    GuardedTask,
    Scope,
    SessionFactory,
    finalize,
    finalize_after,
    report_cleanup_error,
    run_to_completion,
    start_cleanup,
)
from .exceptions import (
    ConcurrencyError,
    CoroutineRequiredError,
    PoolTimeoutError,
    SessionFinalizedError,
)

T = TypeVar("T")

PRECONNECTED = "fastapi_async_sqlalchemy.preconnected"

MULTI_SCOPE_ENDED = (
    "This `async with db(multi_sessions=True):` block has already ended: await every task that "
    "uses the database (or run it with db.gather()) before the block ends."
)


class Child:
    """The session of one task in a multi-session scope."""

    __slots__ = ("cut_off", "finalizing", "managed", "session")

    def __init__(self, managed: bool) -> None:
        self.session: AsyncSession | None = None
        # Run by db.connection()/db.gather(): holds a slot if there are slots, and is finalized
        # in its own task. Otherwise the session was taken straight from db.session and is
        # finalized once its task is done.
        self.managed = managed
        self.finalizing = False  # committing or rolling back: the block waits, never cancels
        self.cut_off = False  # cancelled by the block's end: never committed, whatever happens


class MultiScope(Scope):
    """A scope whose ``session`` depends on the task asking for it."""

    __slots__ = (
        "by_task",
        "cleanups",
        "commit_on_exit",
        "engine",
        "errors",
        "gathering",
        "max_concurrent",
        "owner",
        "pool_timeout",
        "slots",
        "waiting",
    )

    def __init__(
        self,
        factory: SessionFactory,
        engine: AsyncEngine,
        commit_on_exit: bool,
        max_concurrent: int | None,
        pool_timeout: float | None,
    ) -> None:
        super().__init__(factory)
        self.engine = engine
        self.commit_on_exit = commit_on_exit
        self.max_concurrent = max_concurrent
        self.slots = asyncio.Semaphore(max_concurrent) if max_concurrent is not None else None
        self.pool_timeout = pool_timeout
        self.owner = asyncio.current_task()
        # The current child of each task that has one. A task leaves it when its slot ends or,
        # for a session taken straight from db.session, when the task is done.
        self.by_task: dict[asyncio.Task[Any], Child] = {}
        # Tasks waiting for a slot or a connection inside db.connection()/db.gather().
        self.waiting: set[asyncio.Task[Any]] = set()
        # Finalizations of sessions whose tasks are done, and what they raised.
        self.cleanups: set[asyncio.Task[None]] = set()
        self.errors: list[Exception] = []
        self.gathering = 0  # slot holders waiting in db.gather() for their coroutines

    @property
    def throttled(self) -> bool:
        """Whether children must run through db.connection()/db.gather()."""
        return self.slots is not None or self.pool_timeout is not None

    def open(self) -> AsyncSession:
        if self.ended is not None:
            raise SessionFinalizedError(self.ended)
        task = _current_task()
        child = self.by_task.get(task)
        if child is None:
            if task is self.owner:
                if self.pool_timeout is not None:
                    raise ConcurrencyError(
                        "With pool_timeout, db.session cannot get the block's own session: it "
                        "cannot wait within a deadline. Use `async with db.connection() as "
                        "session:` (or db.gather()), which gets the connection in time."
                    )
            elif self.throttled:
                raise ConcurrencyError(
                    "With max_concurrent or pool_timeout, a task reads db.session only inside "
                    "`async with db.connection():` or as a coroutine passed to db.gather(), "
                    "which give it a slot and a deadline."
                )
            else:
                task.add_done_callback(self._task_done)
            child = self.by_task[task] = Child(managed=False)
        session = child.session
        if session is None:
            session = child.session = self.factory()
        return session

    def session_of_current_task(self) -> AsyncSession | None:
        """The session the current task already has here, if any."""
        child = self.by_task.get(_current_task())
        return None if child is None else child.session

    def lends_to_current_task(self) -> bool:
        """Whether db.connection() lends the current task its session, rather than a new slot:
        the task has a session here, or holds a slot (a throttled db.gather() child) whose
        session is made on first use."""
        child = self.by_task.get(_current_task())
        return child is not None and (
            child.session is not None or (child.managed and self.throttled)
        )

    # -- sessions taken straight from db.session -------------------------------------------------

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A task that took db.session is done: finalize its session now, in a cleanup task."""
        child = self.by_task.pop(task, None)
        if child is not None and not child.managed:
            self._finalize_loose(task, child)

    def _finalize_loose(self, task: asyncio.Task[Any], child: Child) -> None:
        session, child.session = child.session, None
        if session is None:
            return
        # Committed only if its task succeeded: half the work of a failed task is never kept,
        # nor the work of a task the block's end cut off (even if it swallowed the cancel).
        commit = (
            self.commit_on_exit
            and not child.cut_off
            and not task.cancelled()
            and task.exception() is None
        )
        cleanup = start_cleanup(self._finalize_quietly(session, commit))
        if not cleanup.done():
            self.cleanups.add(cleanup)
            cleanup.add_done_callback(self.cleanups.discard)

    async def _finalize_quietly(self, session: AsyncSession, commit: bool) -> None:
        try:
            await finalize(session, commit=commit)
        except Exception as exc:  # reported when the block ends
            self.errors.append(exc)

    # -- slotted children: db.connection() and db.gather() --------------------------------------

    def holds_slot(self) -> bool:
        child = self.by_task.get(_current_task())
        return self.slots is not None and child is not None and child.managed

    async def enter_slot(self, deadline: float | None) -> tuple[Child, Child | None]:
        """Take a slot (within ``deadline`` seconds) and make a fresh child current here."""
        if self.ended is not None:
            raise SessionFinalizedError(self.ended)
        task = _current_task()
        previous = self.by_task.get(task)
        child = Child(managed=True)
        if deadline is not None or self.slots is not None:
            # The block's end cancels a task that is still waiting here.
            self.waiting.add(task)
            try:
                if deadline is None:
                    await self.slots.acquire()  # type: ignore[union-attr]
                else:
                    child.session = await open_within(
                        self.factory, self.engine, deadline, self.slots
                    )
            finally:
                self.waiting.discard(task)
        self.by_task[task] = child
        return child, previous

    async def leave_slot(
        self, child: Child, previous: Child | None, failed: BaseException | None
    ) -> None:
        """Finalize the child's session in its own task, give back the slot, restore."""
        task = _current_task()
        child.finalizing = True
        try:
            session, child.session = child.session, None
            if session is not None:
                if failed is None:
                    await finalize(session, commit=self.commit_on_exit and not child.cut_off)
                else:
                    await finalize_after(session, failed)
        finally:
            if self.slots is not None:
                self.slots.release()
            if previous is None:
                self.by_task.pop(task, None)
            else:
                self.by_task[task] = previous

    # -- the end of the block -------------------------------------------------------------------

    async def finish(self, failed: BaseException | None, reason: str) -> None:
        """Cancel children still running or waiting, then finalize every session handed out.

        When the block is already raising (``failed``), cleanup failures are reported beside
        that error and the children cut off are noted on it; otherwise they are raised.
        """
        self.end(reason)
        return await run_to_completion(self._finish(failed))

    async def _finish(self, failed: BaseException | None) -> None:
        owner = self.owner
        # Tasks still at work or waiting for a slot are cancelled; those already finalizing
        # are let finish.
        pending: dict[asyncio.Task[Any], None] = {}
        cut_off = 0
        for task in (*self.waiting, *self.by_task):
            if task is owner or task.done() or task in pending:
                continue
            pending[task] = None
            child = self.by_task.get(task)
            if child is None or not child.finalizing:
                if child is not None:
                    child.cut_off = True
                task.cancel()
                cut_off += 1
        if pending:
            await asyncio.wait(list(pending))
        # Every other task is done now; sessions whose finalization has not started yet
        # (their tasks' callbacks are still queued) are finalized here.
        own = self.by_task.pop(owner, None) if owner is not None else None
        for task, child in list(self.by_task.items()):
            if not child.managed:
                self._finalize_loose(task, child)
        self.by_task.clear()
        while self.cleanups:
            await asyncio.wait(set(self.cleanups))
        errors, self.errors = self.errors, []
        session = None if own is None else own.session
        if session is not None:
            if failed is not None:
                await finalize_after(session, failed)
            else:
                try:
                    await finalize(
                        session,
                        commit=self.commit_on_exit and not cut_off,
                        raise_callback_errors=True,
                    )
                except Exception as exc:
                    errors.append(exc)
        message = (
            f"{cut_off} task(s) still using the database when the multi-session block ended "
            "were cancelled and their work rolled back: await them, or run them with "
            "db.gather(), before the block ends."
        )
        if failed is not None:
            if cut_off:
                failed.add_note(message)
            for error in errors:
                report_cleanup_error(error, failed)
            return
        if cut_off:
            errors.insert(0, ConcurrencyError(message))
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("finalizing the sessions of a multi-session block failed", errors)


@asynccontextmanager
async def _within(deadline: float, engine: object) -> AsyncIterator[None]:
    """Bound the block to ``deadline`` seconds.

    ``PoolTimeoutError`` is raised only when a wait for the pool (or a slot) ran out: this
    deadline, or the engine's own ``pool_timeout`` if that fired first (and then it reports
    that one). A driver's connect timeout, the server not answering, stays the driver's error.
    """
    timeout = asyncio.timeout(deadline)
    fired: float | None = deadline
    try:
        async with timeout:
            yield
        return
    except TimeoutError as exc:
        if not timeout.expired():
            raise
        cause: BaseException = exc
    except SQLAlchemyPoolTimeout as exc:
        cause = exc
        engine_timeout = getattr(getattr(engine, "pool", None), "_timeout", None)
        fired = float(engine_timeout) if isinstance(engine_timeout, int | float) else None
    status = pool_status(engine) if isinstance(engine, AsyncEngine) else None
    raise PoolTimeoutError(fired, pool_status=status) from cause


async def open_within(
    factory: SessionFactory,
    engine: AsyncEngine,
    deadline: float,
    slots: asyncio.Semaphore | None = None,
) -> AsyncSession:
    """A new session holding a connection (and a slot, if any), got within ``deadline`` s.

    On failure nothing stays taken, and running out of time raises ``PoolTimeoutError``.
    """
    session = factory()
    acquired = False
    try:
        async with _within(deadline, engine):
            if slots is not None:
                await slots.acquire()
                acquired = True
            await session.connection()
    except BaseException as exc:
        await finalize_after(session, exc)
        if acquired:
            slots.release()  # type: ignore[union-attr]
        raise
    # The transaction is open only to hold the connection: nothing ran in it yet.
    session.sync_session.info[PRECONNECTED] = session.sync_session.get_transaction()
    return session


def holds_work(session: AsyncSession) -> bool:
    """Whether ``session`` has an open transaction that holds something: more than the empty
    one :func:`open_within` began to hold its connection (as far as can be seen: ORM state)."""
    sync_session = session.sync_session
    transaction = sync_session.get_transaction()
    if transaction is None:
        return False
    if sync_session.info.get(PRECONNECTED) is not transaction:
        return True
    return bool(
        sync_session.new or sync_session.dirty or sync_session.deleted or sync_session.identity_map
    )


async def borrow_within(session: AsyncSession, deadline: float) -> AsyncSession:
    """Make ``session`` hold its connection, got within ``deadline`` seconds."""
    async with _within(deadline, session.bind):
        await session.connection()
    return session


async def gather_children(
    scope: MultiScope, aws: tuple[Awaitable[Any], ...], return_exceptions: bool
) -> list[Any]:
    """``db.gather()`` in a multi-session block: each coroutine runs as a child of its own.

    Everything is checked before any child starts; when a check fails, every coroutine passed
    is closed (none is left "never awaited") and nothing runs. Throttled (``max_concurrent`` or
    ``pool_timeout``), it fails fast like ``asyncio.TaskGroup``: the first error cancels the
    other children (their work is rolled back) before it propagates.
    """
    gathering = False
    if scope.throttled:
        bad = [aw for aw in aws if not asyncio.iscoroutine(aw)]
        if bad:
            _refuse(
                aws,
                CoroutineRequiredError(
                    f"db.gather() with max_concurrent or pool_timeout takes coroutines, not "
                    f"{_kinds(bad)}: pass `work()` rather than `asyncio.create_task(work())`, so "
                    "each runs in a slot."
                ),
            )
        if scope.holds_slot():
            # This caller keeps its slot while it waits: refuse only the call with which every
            # slot would be held by a task waiting for slots.
            if scope.gathering + 1 >= scope.max_concurrent:  # type: ignore[operator]
                _refuse(
                    aws,
                    ConcurrencyError(
                        f"db.gather() would wait for ever: all {scope.max_concurrent} "
                        "max_concurrent slot(s) would be held by tasks waiting in db.gather() "
                        "for slots of their own. Call db.gather() outside the "
                        "`db.connection()` block, or raise max_concurrent."
                    ),
                )
            gathering = True
    else:
        bad = [aw for aw in aws if not inspect.isawaitable(aw)]
        if bad:
            _refuse(aws, TypeError(f"db.gather() takes awaitables, not {_kinds(bad)}."))
    # Throttled and raising on the first error: once one child failed, no other one starts.
    group = _Group() if scope.throttled and not return_exceptions else None
    loop = asyncio.get_running_loop()
    children = [
        GuardedTask(_child(scope, aw, group), loop=loop) if asyncio.iscoroutine(aw) else aw
        for aw in aws
    ]
    if gathering:
        scope.gathering += 1
    try:
        return await asyncio.gather(*children, return_exceptions=return_exceptions)
    except BaseException:
        if group is not None:
            group.failed = True
            await _stop(children, aws)
        elif all(child.done() for child in children if isinstance(child, asyncio.Task)):
            _close_unstarted(aws)  # cancelled before some child ever ran
        raise
    finally:
        if gathering:
            scope.gathering -= 1


async def _stop(children: list[Awaitable[Any]], aws: tuple[Awaitable[Any], ...]) -> None:
    """Cancel the children still running and wait for them; close coroutines never started."""
    running = [child for child in children if isinstance(child, asyncio.Task) and not child.done()]
    for child in running:
        child.cancel()
    if running:
        await asyncio.wait(running)
    _close_unstarted(aws)


def _close_unstarted(aws: tuple[Awaitable[Any], ...]) -> None:
    """Close the coroutines no child ever started, so none is left "never awaited"."""
    for aw in aws:
        if asyncio.iscoroutine(aw) and inspect.getcoroutinestate(aw) == inspect.CORO_CREATED:
            aw.close()


def _kinds(refused: Iterable[object]) -> str:
    return ", ".join(sorted({type(item).__name__ for item in refused}))


def _refuse(aws: tuple[Awaitable[Any], ...], error: Exception) -> NoReturn:
    """Close every coroutine passed (none has started), then raise ``error``."""
    _close_unstarted(aws)
    raise error


class _Group:
    """The children of one fail-fast db.gather(): none starts once one has failed."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False


async def _child(scope: MultiScope, work: Coroutine[Any, Any, T], group: _Group | None) -> T:
    """One coroutine of db.gather(), run in a GuardedTask: its session is finalized under guard."""
    task = asyncio.current_task()
    assert isinstance(task, GuardedTask)
    try:
        child, previous = await scope.enter_slot(scope.pool_timeout)
    except BaseException:
        work.close()
        raise
    failed: BaseException | None = None
    try:
        if group is not None and group.failed:
            work.close()  # a sibling failed while this one waited for its slot
            raise asyncio.CancelledError
        return await work
    except BaseException as exc:
        failed = exc
        if group is not None:
            group.failed = True  # before the slot is given back to a sibling waiting for it
        raise
    finally:
        if failed is None and group is not None and group.failed:
            # A sibling failed while this one finished: nothing of the gather is kept.
            failed = asyncio.CancelledError()
        task.guard()
        try:
            await scope.leave_slot(child, previous, failed)
        except BaseException:
            if group is not None:
                group.failed = True  # its commit failed: no sibling starts any more
            raise
        finally:
            task.unguard()


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:
        raise ConcurrencyError(
            "db.session in a multi-session block must be read from an asyncio task."
        )
    return task
