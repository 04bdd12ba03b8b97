"""Multi-session scopes: one session per task, optional slots and connection deadlines.

Inside ``async with db(multi_sessions=True):`` each task that reads ``db.session`` gets a session
of its own (a single ``AsyncSession`` must never be used by two tasks at once). Work run through
``db.gather()`` or ``db.connection()`` is finalized in its own task, so awaiting it means it is
committed (or rolled back) and closed. Sessions that tasks took directly are finalized when the
block ends; tasks still running then are cancelled, and the user is told.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, NoReturn, TypeVar

from sqlalchemy.exc import TimeoutError as SQLAlchemyPoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._pool import pool_status
from ._scope import GuardedTask, Scope, SessionFactory, finalize, run_to_completion
from .exceptions import (
    ConcurrencyError,
    CoroutineRequiredError,
    PoolTimeoutError,
    SessionFinalizedError,
)

T = TypeVar("T")

MULTI_SCOPE_ENDED = (
    "This `async with db(multi_sessions=True):` block has already ended: await every task that "
    "uses the database (or run it with db.gather()) before the block ends."
)


class Child:
    """The session of one task in a multi-session scope."""

    __slots__ = ("finalizing", "managed", "session", "task")

    def __init__(self, task: asyncio.Task[Any], managed: bool) -> None:
        self.task = weakref.ref(task)
        self.session: AsyncSession | None = None
        # Run by db.connection()/db.gather(): holds a slot if there are slots, and is finalized
        # in its own task. Otherwise the session was taken straight from db.session.
        self.managed = managed
        self.finalizing = False  # committing or rolling back: the block waits, never cancels


class MultiScope(Scope):
    """A scope whose ``session`` depends on the task asking for it."""

    __slots__ = (
        "by_task",
        "commit_on_exit",
        "engine",
        "loose",
        "managed",
        "owner",
        "pool_timeout",
        "slots",
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
        self.slots = asyncio.Semaphore(max_concurrent) if max_concurrent is not None else None
        self.pool_timeout = pool_timeout
        self.owner = asyncio.current_task()
        # The child of each task that has one. A plain dict, not a WeakKeyDictionary (2-3 µs
        # less per db.gather() coroutine): a managed child leaves it when its slot ends, and a
        # loose child's task is kept in ``loose`` until the block ends anyway; then it is cleared.
        self.by_task: dict[asyncio.Task[Any], Child] = {}
        # Children whose sessions the block must finalize: those taken straight from db.session.
        # Their tasks are kept until then, to learn how each ended.
        self.loose: list[tuple[asyncio.Task[Any], Child]] = []
        # Children inside db.connection()/db.gather() right now: they finalize themselves.
        self.managed: set[Child] = set()

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
            if self.throttled and task is not self.owner:
                raise ConcurrencyError(
                    "With max_concurrent or pool_timeout, a task reads db.session only inside "
                    "`async with db.connection():` or as a coroutine passed to db.gather(), "
                    "which give it a slot and a deadline."
                )
            child = self.by_task[task] = Child(task, managed=False)
            self.loose.append((task, child))
        session = child.session
        if session is None:
            session = child.session = self.factory()
        return session

    # -- slotted children: db.connection() and db.gather() --------------------------------------

    def holds_slot(self) -> bool:
        child = self.by_task.get(_current_task())
        return self.slots is not None and child is not None and child.managed

    async def enter_slot(self, deadline: float | None) -> tuple[Child, Child | None]:
        """Take a slot (within ``deadline`` seconds) and make a fresh child current here."""
        task = _current_task()
        previous = self.by_task.get(task)
        child = Child(task, managed=True)
        if deadline is None:
            if self.slots is not None:
                await self.slots.acquire()
        else:
            child.session = await open_within(self.factory, self.engine, deadline, self.slots)
        self.by_task[task] = child
        self.managed.add(child)
        return child, previous

    async def leave_slot(self, child: Child, previous: Child | None, failed: bool) -> None:
        """Finalize the child's session in its own task, give back the slot, restore."""
        task = _current_task()
        child.finalizing = True
        try:
            session, child.session = child.session, None
            if session is not None:
                await finalize(session, commit=self.commit_on_exit and not failed)
        finally:
            self.managed.discard(child)
            if self.slots is not None:
                self.slots.release()
            if previous is None:
                self.by_task.pop(task, None)
            else:
                self.by_task[task] = previous

    # -- the end of the block -------------------------------------------------------------------

    async def finish(self, failed: BaseException | None, reason: str) -> None:
        """Cancel children still running, then finalize every session the block handed out."""
        self.end(reason)
        return await run_to_completion(self._finish(failed))

    async def _finish(self, failed: BaseException | None) -> None:
        loose, self.loose = self.loose, []
        # Children still at work are cancelled; those already finalizing are let finish.
        pending: list[asyncio.Task[Any]] = []
        cut_off = 0
        for child in (*(child for _, child in loose), *self.managed):
            task = child.task()
            if task is None or task is self.owner or task.done():
                continue
            pending.append(task)
            if not child.finalizing:
                task.cancel()
                cut_off += 1
        if pending:
            await asyncio.wait(pending)
        self.by_task.clear()
        errors: list[Exception] = []
        for task, child in loose:
            session, child.session = child.session, None
            if session is None:
                continue
            commit = self.commit_on_exit and failed is None and not cut_off
            if commit and task is not self.owner:
                # A task that failed or was cancelled must not have half its work committed.
                commit = not task.cancelled() and task.exception() is None
            try:
                await finalize(session, commit=commit)
            except Exception as exc:
                errors.append(exc)
        if cut_off:
            message = (
                f"{cut_off} task(s) still using the database when the multi-session block "
                "ended were cancelled and their work rolled back: await them, or run them with "
                "db.gather(), before the block ends."
            )
            if failed is not None:
                failed.add_note(message)
            else:
                errors.insert(0, ConcurrencyError(message))
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("finalizing the sessions of a multi-session block failed", errors)


class SlotContext:
    """``async with db.connection() as session:`` inside a multi-session block."""

    __slots__ = ("_child", "_previous", "_scope", "_timeout")

    def __init__(self, scope: MultiScope, timeout: float | None) -> None:
        self._scope = scope
        self._timeout = timeout
        self._child: Child | None = None
        self._previous: Child | None = None

    async def __aenter__(self) -> AsyncSession:
        scope = self._scope
        if scope.ended is not None:
            raise SessionFinalizedError(scope.ended)
        child, self._previous = await scope.enter_slot(self._timeout)
        self._child = child
        session = child.session
        if session is None:
            session = child.session = scope.factory()
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        child, self._child = self._child, None
        assert child is not None
        await self._scope.leave_slot(child, self._previous, failed=exc_type is not None)


class BorrowedSession:
    """``db.connection()`` where a session is already at hand: lends it, never closes it."""

    __slots__ = ("_session", "_timeout")

    def __init__(self, session: AsyncSession, timeout: float | None) -> None:
        self._session = session
        self._timeout = timeout

    async def __aenter__(self) -> AsyncSession:
        if self._timeout is None:
            return self._session
        return await borrow_within(self._session, self._timeout)

    async def __aexit__(self, *exc_info: object) -> None:
        return None


@asynccontextmanager
async def _within(deadline: float, engine: object) -> AsyncIterator[None]:
    """Bound the block to ``deadline`` seconds; running out raises ``PoolTimeoutError``."""
    try:
        async with asyncio.timeout(deadline):
            yield
    except (TimeoutError, SQLAlchemyPoolTimeout) as exc:
        status = pool_status(engine) if isinstance(engine, AsyncEngine) else None
        raise PoolTimeoutError(deadline, pool_status=status) from exc


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
    except BaseException:
        await finalize(session, commit=False)
        if acquired:
            slots.release()  # type: ignore[union-attr]
        raise
    return session


async def borrow_within(session: AsyncSession, deadline: float) -> AsyncSession:
    """Make ``session`` hold its connection, got within ``deadline`` seconds."""
    async with _within(deadline, session.bind):
        await session.connection()
    return session


async def gather_children(
    scope: MultiScope, aws: tuple[Awaitable[Any], ...], return_exceptions: bool
) -> list[Any]:
    """``db.gather()`` in a multi-session block: each coroutine runs as a slotted child.

    Everything is checked before any child starts; when a check fails, every coroutine passed
    is closed (none is left "never awaited") and nothing runs.
    """
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
            _refuse(
                aws,
                ConcurrencyError(
                    "db.gather() was called from a task that holds a max_concurrent slot and "
                    "would wait for slots its own caller holds: call db.gather() from the block "
                    "itself, or await the coroutines one by one in this slot."
                ),
            )
    else:
        bad = [aw for aw in aws if not inspect.isawaitable(aw)]
        if bad:
            _refuse(aws, TypeError(f"db.gather() takes awaitables, not {_kinds(bad)}."))
    loop = asyncio.get_running_loop()
    wrapped = [
        GuardedTask(_child(scope, aw), loop=loop) if asyncio.iscoroutine(aw) else aw for aw in aws
    ]
    return await asyncio.gather(*wrapped, return_exceptions=return_exceptions)


def _kinds(refused: Iterable[object]) -> str:
    return ", ".join(sorted({type(item).__name__ for item in refused}))


def _refuse(aws: tuple[Awaitable[Any], ...], error: Exception) -> NoReturn:
    """Close every coroutine passed (none is left "never awaited"), then raise ``error``."""
    for aw in aws:
        if asyncio.iscoroutine(aw):
            aw.close()
    raise error


async def _child(scope: MultiScope, work: Coroutine[Any, Any, T]) -> T:
    """One coroutine of db.gather(), run in a GuardedTask: its session is finalized under guard."""
    task = asyncio.current_task()
    assert isinstance(task, GuardedTask)
    try:
        child, previous = await scope.enter_slot(scope.pool_timeout)
    except BaseException:
        work.close()
        raise
    failed = True
    try:
        result = await work
        failed = False
    finally:
        task.guard()
        try:
            await scope.leave_slot(child, previous, failed=failed)
        finally:
            task.unguard()
    return result


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:
        raise ConcurrencyError(
            "db.session in a multi-session block must be read from an asyncio task."
        )
    return task
