"""Per-test isolation: ``async with isolated():`` rolls back everything the app wrote.

Inside the block, every session that a proxy's session factory makes (request sessions,
``async with db():``, multi-session children, ``db.gather()``, background tasks) is given a
``Session`` subclass whose ``get_bind()`` answers with one connection per engine, opened on first
use with an outer transaction the test owns. The sessions join it with
``join_transaction_mode="create_savepoint"``: an app commit releases its savepoint, an app
rollback rolls back to it, and rows the test seeded stay. At the end the outer transaction is
rolled back and the connection closed. Nothing is patched on the engine: the factories get the
subclass for the duration of the block, and get their own class back after.

Sessions that share the connection take turns on its savepoint stack. A task may open a
savepoint when the stack is empty, when the innermost one is its own, or when the innermost one
belongs to a task it was started from (a parent suspended in ``db.gather()`` lets its children
stack on top); otherwise it waits for that transaction to end. A savepoint is released or rolled
back only once it is innermost again. Waits are bounded: a task waiting on work that waits on it
gets an ``IsolationError`` naming the holder.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.util.concurrency import greenlet_spawn, in_greenlet

from .. import _proxy
from .._config import check_seconds
from .._greenlet import await_
from .._router import Router
from .._where import caller as _caller
from ..exceptions import FastAPIAsyncSQLAlchemyError
from ._queries import KIT

__all__ = ["IsolationError", "isolated"]


class IsolationError(FastAPIAsyncSQLAlchemyError):
    """Something escaped (or would escape) the test transaction of ``isolated()``, or a task
    waited too long for its turn on the test connection."""


# Comments an ORM or a user may put before the statement's first keyword.
_LEAD = r"\s*(?:(?:/\*.*?\*/|--[^\n]*\n|\#[^\n]*\n)\s*)*"
_ENDS_TRANSACTION = re.compile(_LEAD + r"(COMMIT|END|ABORT|ROLLBACK(?!\s+TO\b))\b", re.I | re.S)
_SAVEPOINT = re.compile(r"\s*SAVEPOINT\s+(\S+)", re.I)
_SAVEPOINT_STATEMENT = re.compile(r"\s*(SAVEPOINT|RELEASE|ROLLBACK\s+TO)\b", re.I)
# Statements after which MariaDB and MySQL commit the transaction by themselves.
_IMPLICIT_COMMIT = re.compile(
    _LEAD + r"(ALTER|CREATE|DROP|RENAME|TRUNCATE|GRANT|REVOKE|LOCK\s+TABLES|UNLOCK\s+TABLES|"
    r"ANALYZE|OPTIMIZE|REPAIR|FLUSH|START\s+TRANSACTION|BEGIN|SET\s+autocommit)\b",
    re.I | re.S,
)
_TEMPORARY = re.compile(
    _LEAD + r"(CREATE(\s+OR\s+REPLACE)?|DROP)\s+TEMPORARY\s+TABLE\b", re.I | re.S
)

_KITS = {KIT: True}  # the kit's own statements: not the app's queries

# The session factory's keywords that isolated() sets, and puts back after.
_SWAPPED = ("sync_session_class", "join_transaction_mode")

_current: Isolation | None = None


class _Owner:
    """A task that opened a savepoint, and the owner current where the task was started (for
    the task that entered ``isolated()``: none, and ``isolation`` is set)."""

    __slots__ = ("isolation", "parent", "task")

    def __init__(
        self,
        task: asyncio.Task[Any] | None,
        parent: _Owner | None,
        isolation: Isolation | None = None,
    ) -> None:
        self.task = task
        self.parent = parent
        self.isolation = isolation

    def within(self, other: _Owner, parents: Mapping[asyncio.Task[Any], asyncio.Task[Any]]) -> bool:
        """Whether this owner is ``other`` or its task was started (transitively) from
        ``other``'s: through the owners current where each task started, and through the
        tasks the loop's task factory saw started (a task started before its parent's first
        statement inherited no owner of the parent's)."""
        owner: _Owner | None = self
        while owner is not None:
            if owner is other:
                return True
            task = owner.task
            while task is not None:
                task = parents.get(task)
                if task is not None and task is other.task:
                    return True
            owner = owner.parent
        return False

    def root(self) -> _Owner:
        owner = self
        while owner.parent is not None:
            owner = owner.parent
        return owner


_owner: ContextVar[_Owner | None] = ContextVar(
    "fastapi_async_sqlalchemy.isolation_owner", default=None
)


def _current_owner() -> _Owner:
    """The owner of the current task; made on its first savepoint. Tasks started after that
    inherit it as their parent (a context variable travels with the tasks a task starts)."""
    task = asyncio.current_task()
    owner = _owner.get()
    if owner is None or owner.task is not task:
        owner = _Owner(task, owner)
        _owner.set(owner)
    return owner


class _Savepoint:
    __slots__ = ("name", "owner", "where")

    def __init__(self, owner: _Owner, where: str) -> None:
        self.name: str | None = None  # known once the SAVEPOINT statement is sent
        self.owner = owner
        self.where = where

    def describe(self, *, first: bool = False) -> str:
        task = self.owner.task
        name = task.get_name() if task is not None else "no task"
        return f"{'T' if first else 't'}he transaction begun at {self.where} (task {name!r})"


class _Lane:
    """The test's connection to one engine, its outer transaction and its savepoint stack."""

    def __init__(self, isolation: Isolation, engine: Engine) -> None:
        self.isolation = isolation
        self.engine = engine
        self.connection: Connection | None = None  # once open and in its transaction
        self.own: Connection | None = None  # from the checkout on: its statements are the kit's
        self.opening: asyncio.Future[None] | None = None
        self.stack: list[_Savepoint] = []
        # A SAVEPOINT, RELEASE or ROLLBACK TO taken off or put on the stack, whose statement
        # has not run yet (the driver may suspend before sending it): the others wait.
        self.busy: _Savepoint | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.sqlite_level: Any = None

    # -- opening and closing, in a greenlet -----------------------------------------------------

    def connect(self) -> Connection:
        """The lane's connection, opened on first use (called from ``get_bind()``)."""
        connection = self.connection
        if connection is not None:
            self._check_usable()
            return connection
        if self.opening is not None:
            await_(asyncio.shield(self.opening))
            assert self.connection is not None
            return self.connection
        self.opening = asyncio.get_running_loop().create_future()
        try:
            self.connection = self._open()
        except BaseException as error:
            self.opening.set_exception(error)
            self.opening.exception()  # retrieved: the waiters re-raise it
            self.opening = None
            raise
        self.opening.set_result(None)
        return self.connection

    def _open(self) -> Connection:
        self.isolation.connecting += 1
        try:
            connection = self.own = self.engine.connect()
        finally:
            self.isolation.connecting -= 1
        try:
            if connection.dialect.name == "sqlite":
                # pysqlite's own transaction handling would commit on SAVEPOINT: switch it off
                # on this connection for the test and begin the transaction ourselves.
                dbapi = connection.connection.dbapi_connection
                self.sqlite_level = dbapi.isolation_level  # type: ignore[union-attr]
                dbapi.isolation_level = None  # type: ignore[union-attr]
                connection.begin()
                if not connection.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                    # unless a "begin" listener sent it
                    connection.exec_driver_sql("BEGIN", execution_options=_KITS)
            else:
                connection.begin()
                if connection.dialect.name in ("mysql", "mariadb"):
                    # Begun now, not at the first table touched: @@in_transaction then tells
                    # whether something committed it meanwhile.
                    connection.exec_driver_sql("START TRANSACTION", execution_options=_KITS)
        except BaseException:
            connection.invalidate()
            connection.close()
            raise
        event.listen(connection, "savepoint", self._savepoint)
        event.listen(connection, "release_savepoint", self._release)
        event.listen(connection, "rollback_savepoint", self._roll_back)
        event.listen(connection, "commit", self._commit)
        return connection

    def close(self) -> list[str]:
        """Roll back the test transaction and close; what went wrong, said in sentences."""
        problems: list[str] = []
        connection = self.connection
        if connection is None:
            return problems
        self.connection = None
        for savepoint in self.stack:
            problems.append(
                f"{savepoint.describe(first=True)} was still open when the test ended: await "
                "the tasks that use the database (and end their sessions) before the test "
                "returns."
            )
        self.stack.clear()
        self._wake()
        if connection.invalidated:
            problems.append(self.isolation.invalidated())
        try:
            if not connection.invalidated and not _still_in_transaction(connection):
                problems.append(
                    "The test transaction was ended early (an implicit commit, such as DDL on "
                    "MariaDB or executescript() on SQLite, or a COMMIT or ROLLBACK sent around "
                    "the kit): what was written before it may be in the database, and what "
                    "was written after it is."
                )
            transaction = connection.get_transaction()
            if transaction is not None:
                transaction.rollback()
            if self.sqlite_level is not None and not connection.invalidated:
                dbapi = connection.connection.dbapi_connection
                if dbapi is not None:
                    dbapi.rollback()
                    dbapi.isolation_level = self.sqlite_level
        finally:
            connection.close()
        return problems

    # -- turns on the savepoint stack, from SQLAlchemy's events (in a greenlet) -----------------

    def _savepoint(self, connection: Connection, name: str | None) -> None:
        self._check_usable()
        owner = _current_owner()
        where = _caller()
        parents = self.isolation.parents

        def my_turn() -> bool:
            return self.busy is None and (
                not self.stack or owner.within(self.stack[-1].owner, parents)
            )

        if not my_turn():
            await_(self._wait(my_turn, where))
        savepoint = _Savepoint(owner, where)
        self.stack.append(savepoint)
        self.busy = savepoint  # until its SAVEPOINT statement has run

    def _check_usable(self) -> None:
        """Raise once SQLAlchemy invalidated the test connection (the transaction is gone)."""
        own = self.own
        if own is not None and own.invalidated:
            self.stack.clear()
            self._wake()
            raise IsolationError(self.isolation.invalidated())

    def ran(self, statement: str, failed: bool) -> None:
        """A statement on the lane's connection has run (or ``failed``)."""
        busy = self.busy
        if busy is None or not _SAVEPOINT_STATEMENT.match(statement):
            return
        self.busy = None
        if failed and _SAVEPOINT.match(statement) and busy in self.stack:
            self.stack.remove(busy)  # its SAVEPOINT failed: it never existed
        self._wake()

    def _release(self, connection: Connection, name: str, context: Any) -> None:
        self._end_savepoint(connection, name, releasing=True)

    def _roll_back(self, connection: Connection, name: str, context: Any) -> None:
        self._end_savepoint(connection, name, releasing=False)

    def _end_savepoint(self, connection: Connection, name: str, *, releasing: bool) -> None:
        """Wait until the savepoint ``name`` is the innermost, then take it off the stack."""
        self._check_usable()
        savepoint = next((entry for entry in reversed(self.stack) if entry.name == name), None)
        if savepoint is None:  # its SAVEPOINT statement went unseen: the innermost unnamed one
            savepoint = next((entry for entry in reversed(self.stack) if entry.name is None), None)
        if savepoint is None:
            return
        above = self.stack[self.stack.index(savepoint) + 1 :]
        task, mine = asyncio.current_task(), _owner.get()
        if above and all(entry.owner is mine or entry.owner.task is task for entry in above):
            # Waiting could only deadlock: the transactions in the way are this task's own (or,
            # for a commit run in a cleanup task, those of the task it finishes for).
            problem = (
                f"{savepoint.describe(first=True)} ends while {above[-1].describe()}, begun "
                "after it in the same task, is still open. Under isolated() the sessions of one "
                "task share one connection, so they must end in the reverse order of their "
                "first statements: give the later session its first statement first, or end "
                "it first."
            )
            if releasing:  # releasing it would release the later ones too
                raise self.isolation.breach(problem)
            self.isolation.breaches.append(f"{problem} Its rollback undid the later one too.")
        else:

            def my_turn() -> bool:
                return self.busy is None and (
                    savepoint not in self.stack or self.stack[-1] is savepoint
                )

            if not my_turn():
                await_(self._wait(my_turn, savepoint.where))
        if savepoint in self.stack:
            del self.stack[self.stack.index(savepoint) :]
        if not connection.invalidated:  # else no statement runs: nothing to wait for
            self.busy = savepoint
        self._wake()

    def _commit(self, connection: Connection) -> None:
        raise self.isolation.breach(
            "A COMMIT of the test transaction itself (not of a session: a connection's "
            f"commit()) at {_caller()}: the data would stay in the database after the test."
        )

    def statement(self, statement: str) -> None:
        """A statement on the lane's connection: name the savepoint it opens, refuse commits."""
        opened = _SAVEPOINT.match(statement)
        if opened is not None:
            if self.busy is not None and self.busy.name is None:
                self.busy.name = opened.group(1).strip('"`')
            return
        ended = _ENDS_TRANSACTION.match(statement)
        if ended is not None:
            raise self.isolation.breach(
                f"A {ended.group(1).upper()} statement at {_caller()} would end the test "
                "transaction: what the test wrote before it would be committed or lost, and "
                "what it writes after it would stay in the database."
            )
        if (
            self.engine.dialect.name in ("mysql", "mariadb")
            and _IMPLICIT_COMMIT.match(statement)
            and not _TEMPORARY.match(statement)
        ):
            raise self.isolation.breach(
                f"{' '.join(statement.split())[:60]!r} at {_caller()} commits the transaction "
                "by itself on MariaDB/MySQL: run DDL before the isolated test (say in a session "
                "fixture), not inside it."
            )

    async def _wait(self, ready: Callable[[], bool], where: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.isolation.timeout
        while not ready():
            self._check_usable()
            remaining = deadline - loop.time()
            holder = self.stack[-1] if self.stack else None
            if remaining <= 0:
                held = holder.describe() if holder is not None else "another transaction"
                raise IsolationError(
                    f"The transaction at {where} waited {self.isolation.timeout:g}s for its "
                    f"turn on the test connection, held by {held}. Sessions sharing the "
                    "test connection take turns: this looks like a task waiting on work that "
                    "waits on it; let the holder finish first (or raise "
                    "isolated(turn_timeout=...) if it is only slow)."
                )
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                with suppress(ValueError):
                    self.waiters.remove(waiter)

    def _wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


def _still_in_transaction(connection: Connection) -> bool:
    """Whether the database connection under ``connection`` still has a transaction open."""
    driver = connection.connection.driver_connection
    name = connection.dialect.name
    if name == "sqlite":
        return bool(driver.in_transaction)  # type: ignore[union-attr]
    if name == "postgresql":
        is_in_transaction = getattr(driver, "is_in_transaction", None)  # asyncpg
        if is_in_transaction is not None:
            return bool(is_in_transaction())
        return str(driver.info.transaction_status.name) != "IDLE"  # type: ignore[union-attr]
    if name in ("mysql", "mariadb"):
        try:
            value = connection.exec_driver_sql(
                "SELECT @@in_transaction", execution_options=_KITS
            ).scalar()
        except Exception:  # MySQL has no @@in_transaction: nothing to check there
            return True
        return bool(value)
    return True


class Isolation:
    """The state of one ``isolated()`` block: a lane per engine, the factories it covers, and
    the breaches seen."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.lanes: dict[Engine, _Lane] = {}
        self.covered: dict[int, tuple[async_sessionmaker[AsyncSession], dict[str, Any]]] = {}
        self.watched: list[Engine] = []
        self.breaches: list[str] = []
        self.connecting = 0  # lanes being opened: their checkouts are the kit's own
        self.ended = False
        # Each task started in the block -> the task that started it (the loop's task factory).
        self.parents: weakref.WeakKeyDictionary[asyncio.Task[Any], asyncio.Task[Any]] = (
            weakref.WeakKeyDictionary()
        )
        self.invalidation: BaseException | None = None
        self.classes: dict[type[Session], type[Session]] = {}
        # Read replicas mirror their primary, as in Django's tests: the engines their sessions
        # read through share the primary's lane (and see what the test wrote there), and their
        # health checks pause for the block.
        self.mirrors: dict[Engine, Engine] = {}
        self.paused: list[Router] = []

    def invalidated(self) -> str:
        cause = self.invalidation
        because = f" ({type(cause).__name__})" if cause is not None else ""
        return (
            f"SQLAlchemy invalidated the test connection{because}, as it does when a task is "
            "cancelled during a statement or the connection breaks: the test transaction went "
            "with it, and all the test and the app wrote in it. Do not cancel tasks in the "
            "middle of a statement in an isolated test (asyncio.wait_for() or asyncio.timeout() "
            "around a query, a db.gather() sibling cut off by a failure)."
        )

    def breach(self, message: str) -> IsolationError:
        self.breaches.append(message)
        return IsolationError(message)

    # -- covering the proxies' factories --------------------------------------------------------

    def cover(self, binding: _proxy.Binding) -> None:
        """Make the sessions of ``binding``'s factory join this isolation from now on."""
        factory = binding.factory
        self.watch(binding.engine.sync_engine)
        router = binding.router
        if router is not None and router not in self.paused:
            for reader in router.replicas.readers:
                self.mirrors[reader] = binding.engine.sync_engine
            router.replicas.pause()
            self.paused.append(router)
        if id(factory) in self.covered:
            return
        kw = factory.kw
        saved: dict[str, Any] = {key: kw[key] for key in _SWAPPED if key in kw}
        self.covered[id(factory)] = (factory, saved)
        base = kw.get("sync_session_class") or factory.class_.sync_session_class
        kw["sync_session_class"] = self.session_class(base)
        kw["join_transaction_mode"] = "create_savepoint"

    def session_class(self, base: type[Session]) -> type[Session]:
        isolated_class = self.classes.get(base)
        if isolated_class is None:
            isolation = self

            def get_bind(self: Session, *args: Any, **kw: Any) -> Any:
                return isolation.bind_for(base.get_bind(self, *args, **kw))

            isolated_class = self.classes[base] = type(
                base.__name__, (base,), {"get_bind": get_bind, "__module__": base.__module__}
            )
        return isolated_class

    def bind_for(self, bind: Any) -> Any:
        """What an isolated session uses instead of ``bind``: the test connection of its engine."""
        if not isinstance(bind, Engine):
            return bind
        bind = self.mirrors.get(bind, bind)
        if self.ended:
            raise IsolationError(
                "A session opened inside isolated() was used after the block ended: a task the "
                "test left running? Await every task that uses the database within the test."
            )
        lane = self.lanes.get(bind)
        if not in_greenlet():
            # Not about to run a statement (say, reading get_bind().dialect): nothing to open.
            return lane.connection if lane is not None and lane.connection is not None else bind
        if asyncio.get_running_loop() is not self.loop:
            raise IsolationError(
                "The app runs in another event loop than the test (Starlette's TestClient "
                "runs it in a thread of its own), so it cannot share the test's connection: "
                "drive it with `httpx.AsyncClient(transport=httpx.ASGITransport(app=app))` "
                "from the async test instead."
            )
        if lane is None:
            self.watch(bind)
            lane = self.lanes[bind] = _Lane(self, bind)
        return lane.connect()

    # -- watching isolated engines for connections that are not the test's ----------------------

    def watch(self, engine: Engine) -> None:
        if engine in self.watched:
            return
        self.watched.append(engine)
        for name, listener in self._listeners():
            event.listen(engine, name, listener)

    def unwatch(self) -> None:
        for engine in self.watched:
            for name, listener in self._listeners():
                event.remove(engine, name, listener)
        self.watched.clear()

    def _listeners(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("checkout", self._checkout),
            ("before_cursor_execute", self._statement),
            ("after_cursor_execute", self._ran),
            ("handle_error", self._error),
            ("invalidate", self._invalidate),
        ]

    def _ran(self, connection: Connection, cursor: Any, statement: str, *_: Any) -> None:
        lane = self.lanes.get(connection.engine)
        if lane is not None and connection is lane.own:
            lane.ran(statement, failed=False)

    def _error(self, context: Any) -> None:
        lane = self.lanes.get(context.engine)
        if lane is not None and context.connection is lane.own:
            lane.ran(context.statement or "", failed=True)

    def _invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        if self.invalidation is None:
            self.invalidation = exception
        for lane in self.lanes.values():
            lane._wake()  # waiters see the connection is gone

    def _checkout(self, *_: Any) -> None:
        if not self.connecting:
            self.breaches.append(
                f"A connection of its own was checked out of an isolated engine at {_caller()} "
                "(engine.connect()/begin(), or a session not made by a proxy): what it writes "
                "would not be rolled back. Use db.session or `async with db():` in the app."
            )

    def _statement(self, connection: Connection, cursor: Any, statement: str, *_: Any) -> None:
        lane = self.lanes.get(connection.engine)
        if lane is not None and connection is lane.own:
            if lane.connection is not None:  # the kit's own statements while opening pass
                lane.statement(statement)
            return
        raise IsolationError(
            f"{' '.join(statement.split())[:60]!r} at {_caller()} runs on a connection of its "
            "own, outside the test transaction, so it would not be rolled back: use db.session "
            "or `async with db():` in the app."
        )

    # -- the end --------------------------------------------------------------------------------

    def uncover(self) -> None:
        for factory, saved in self.covered.values():
            for key in _SWAPPED:
                factory.kw.pop(key, None)
            factory.kw.update(saved)
        self.covered.clear()

    async def close(self) -> list[str]:
        """Undo everything; the breaches and leftovers, as sentences."""
        self.ended = True
        self.uncover()
        _proxy.bind_watchers.remove(self.cover)
        problems = list(self.breaches)
        try:
            for lane in list(self.lanes.values()):
                try:
                    problems.extend(await greenlet_spawn(lane.close))
                except Exception as error:
                    problems.append(f"Rolling back the test transaction failed: {error!r}")
        finally:
            self.unwatch()
            self.lanes.clear()
            for router in self.paused:
                await router.replicas.resume()
            self.paused.clear()
        return problems


@asynccontextmanager
async def isolated(*, turn_timeout: float = 10.0) -> AsyncIterator[None]:
    """Run the block in a transaction that is rolled back at its end.

    Every session any proxy opens inside (requests driven through
    ``httpx.AsyncClient(transport=ASGITransport(app))``, ``async with db():`` blocks,
    multi-session children, ``db.gather()``, background tasks) shares one connection per engine
    and its transaction; app commits are savepoint releases. ``turn_timeout`` bounds how long a
    session waits for its turn on that connection. Raises ``IsolationError`` at the end if
    something escaped (a COMMIT, an implicit commit, a connection of its own).
    """
    global _current
    seconds = check_seconds("turn_timeout", turn_timeout)
    if _current is not None:
        raise IsolationError(
            "isolated() blocks do not nest: the test is already isolated (say by the "
            "db_isolation fixture)."
        )
    isolation = _current = Isolation(seconds)
    for proxy in list(_proxy.proxies):
        binding = proxy._binding
        if binding is not None:
            isolation.cover(binding)
    _proxy.bind_watchers.append(isolation.cover)
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    recording = _recording(factory, isolation.parents)
    loop.set_task_factory(recording)
    if not event.contains(Session, "after_begin", _begun):
        event.listen(Session, "after_begin", _begun)
    token = _owner.set(_Owner(asyncio.current_task(), None, isolation))
    try:
        try:
            yield
        except BaseException as error:
            problems = await isolation.close()
            for problem in problems:
                error.add_note(f"isolated(): {problem}")
            raise
        problems = await isolation.close()
        if problems:
            raise IsolationError(" ".join(problems))
    finally:
        _current = None
        if loop.get_task_factory() is recording:  # unless someone replaced it meanwhile
            loop.set_task_factory(factory)
        with suppress(ValueError):
            _owner.reset(token)


def _recording(
    factory: Any, parents: weakref.WeakKeyDictionary[asyncio.Task[Any], asyncio.Task[Any]]
) -> Any:
    """The loop's task factory (``factory``, or plain tasks) noting who started each task."""

    def start(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if factory is None:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        else:
            task = factory(loop, coro, **kwargs)
        starter = asyncio.current_task(loop)
        if starter is not None:
            parents[task] = starter
        return task

    return start


def _begun(session: Session, transaction: Any, connection: Connection) -> None:
    """A transaction begins in a task started inside an ``isolated()`` block that has ended:
    what it writes would stay in the database."""
    owner = _owner.get()
    if owner is None:
        return
    root = owner.root()
    isolation = root.isolation
    if isolation is not None and isolation.ended and asyncio.current_task() is not root.task:
        raise IsolationError(
            "A task started inside isolated() used the database after the block ended: what "
            "it writes would stay in the database and leak into the next test. Await (or "
            "cancel) the tasks the test starts before it ends."
        )
