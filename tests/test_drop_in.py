"""Code written for 0.8.1 behaves as it did there: the behaviours a drop-in replacement keeps.

Each test states one rule of SPEC §3-§10 that 0.8.1 users rely on; tests/test_against_081.py
runs the same user code against the published 0.8.1 and compares.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import (
    Database,
    Row,
    bound,
    http_scope,
    make_app,
    new_item,
    serve,
    unused_app,
    while_the_pool_is_held,
)
from fastapi import BackgroundTasks, FastAPI
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.testclient import TestClient

from fastapi_async_sqlalchemy import (
    ConcurrencyError,
    DBSessionMeta,
    PoolTimeoutError,
    ProxyBindingError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

LOGGER = "fastapi_async_sqlalchemy.middleware"


class Boom(Exception):
    """The error user code raises on purpose."""


@pytest.fixture
async def db(database: Database) -> AsyncIterator[DBSessionMeta]:
    """A proxy bound to the test database with a pool of three and no overflow."""
    async with bound(database.url, pool_size=3, max_overflow=0, pool_timeout=5) as proxy:
        yield proxy


def checked_out(db: DBSessionMeta) -> int:
    return db.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


class Checkins:
    """Counts connections given back to ``db``'s pool; :meth:`wait` for the next ``count``."""

    def __init__(self, db: DBSessionMeta) -> None:
        self.returned = 0
        self.changed = asyncio.Event()
        event.listen(db.engine.sync_engine, "checkin", self._checkin)

    def _checkin(self, *_: object) -> None:
        self.returned += 1
        self.changed.set()

    async def wait(self, count: int) -> None:
        target = self.returned + count
        while self.returned < target:
            self.changed.clear()
            await self.changed.wait()


def failing_close(session: AsyncSession) -> None:
    """Make ``session.close()`` fail after it has really closed (so nothing leaks)."""
    real_close = session.close

    async def close() -> None:
        await real_close()
        raise RuntimeError("close failed")

    session.close = close  # type: ignore[method-assign]


def cleanup_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == LOGGER and record.levelno == logging.ERROR and record.exc_info
    ]


# -- 1. a task that took db.session in a multi-session block is finalized when it is done -------


async def test_twenty_children_on_a_pool_of_three_all_finish(db: DBSessionMeta) -> None:
    """Each child's session goes back to the pool when the child is done, so twenty children
    that read db.session directly share a pool of three without a pool timeout."""

    async def child(number: int) -> int:
        return (await db.session.execute(select(number))).scalar_one()  # type: ignore[no-any-return]

    async with asyncio.timeout(20), db(multi_sessions=True, commit_on_exit=True):
        results = await asyncio.gather(*(child(number) for number in range(20)))
    assert results == list(range(20))
    assert checked_out(db) == 0


async def test_child_work_is_committed_when_its_task_is_done(
    database: Database, db: DBSessionMeta
) -> None:
    """A child that wrote through db.session is committed as soon as its task is done, while
    the block goes on; three concurrent writers never lock each other out on SQLite."""

    async def write(name: str) -> None:
        await db.session.execute(new_item(name))

    checkins = Checkins(db)
    async with asyncio.timeout(20), db(multi_sessions=True, commit_on_exit=True):
        await asyncio.create_task(write("first"))
        await checkins.wait(1)  # committed and given back while the block goes on
        seen_while_block_runs = await database.names()
        await asyncio.gather(*(write(f"writer-{number}") for number in range(3)))
    assert seen_while_block_runs == ["first"]
    assert await database.names() == ["first", "writer-0", "writer-1", "writer-2"]
    assert checked_out(db) == 0


@pytest.mark.parametrize("ending", ["raises", "is cancelled"])
async def test_child_that_fails_is_rolled_back_when_its_task_is_done(
    database: Database, db: DBSessionMeta, ending: str
) -> None:
    """A child task that raised or was cancelled has its session rolled back and its connection
    returned as soon as it is done; its siblings' work is kept."""
    wrote = asyncio.Event()

    async def write_then_end() -> None:
        await db.session.execute(new_item("failed"))
        wrote.set()
        if ending == "raises":
            raise Boom("child failed")
        await asyncio.Event().wait()

    async def write() -> None:
        await db.session.execute(new_item("kept"))

    checkins = Checkins(db)
    async with asyncio.timeout(20), db(multi_sessions=True, commit_on_exit=True):
        failing = asyncio.create_task(write_then_end())
        await wrote.wait()
        failing.cancel()
        await asyncio.gather(failing, return_exceptions=True)
        await checkins.wait(1)  # rolled back and given back while the block goes on
        in_use = checked_out(db)
        await asyncio.create_task(write())
    assert in_use == 0
    assert await database.names() == ["kept"]


# -- 2. admission permits come back with the response, not after its background tasks ----------


async def test_slow_background_task_does_not_hold_the_request_permit(database: Database) -> None:
    """With max_concurrent_requests=1, a second request is served while the first request's
    background task still runs: the permit came back with the first response's body."""
    app, db = make_app(database, max_concurrent_requests=1, request_queue_timeout=0.2)
    release = asyncio.Event()
    background_done = asyncio.Event()

    async def slow_background_work() -> None:
        await release.wait()
        background_done.set()

    @app.get("/work")
    async def work(background: BackgroundTasks, slow: bool = False) -> dict[str, int]:
        if slow:
            background.add_task(slow_background_work)
        return {"answer": (await db.session.execute(text("SELECT 1"))).scalar_one()}

    async with serve(app):
        first_sent: list[dict[str, Any]] = []
        body_sent = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            first_sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                body_sent.set()

        async with asyncio.timeout(10):
            scope = http_scope("GET", "/work")
            scope["query_string"] = b"slow=true"
            first = asyncio.create_task(app(scope, receive, send))
            await body_sent.wait()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                second = await client.get("/work", timeout=5)
                # ASGITransport waits for the whole call, background task included.
                assert not first.done()
                release.set()
            await first
    assert first_sent[0]["status"] == 200
    assert second.status_code == 200
    assert background_done.is_set()


# -- 3. leaving a block cancels tasks still waiting inside db.connection() ----------------------


@pytest.mark.parametrize("waiting_for", ["a slot", "a pool connection"])
async def test_task_waiting_in_connection_is_cancelled_at_block_exit(
    database: Database, waiting_for: str
) -> None:
    """A task still waiting inside db.connection() when the block ends is cancelled and
    reported; its body never runs, not even after the block."""
    async with bound(database.url, pool_size=1, max_overflow=0) as db:
        holding = asyncio.Event()
        body_ran: list[str] = []
        tasks: list[asyncio.Task[None]] = []

        async def hold() -> None:
            async with db.connection() as session:
                await session.execute(text("SELECT 1"))
                holding.set()
                await asyncio.Event().wait()

        async def wait_then_work() -> None:
            async with db.connection() as session:
                body_ran.append("ran")
                await session.execute(new_item("late"))

        throttle = {"max_concurrent": 1} if waiting_for == "a slot" else {"pool_timeout": 10}
        with pytest.raises(ConcurrencyError, match="2 task"):
            async with (
                asyncio.timeout(10),
                db(multi_sessions=True, commit_on_exit=True, **throttle),
            ):
                tasks.append(asyncio.create_task(hold()))
                await holding.wait()
                tasks.append(asyncio.create_task(wait_then_work()))
                for _ in range(5):
                    await asyncio.sleep(0)  # the second task is now waiting
        after_block = [task.cancelled() for task in tasks]
        await asyncio.sleep(0.05)
        assert after_block == [True, True]
        assert body_ran == []
        assert await database.names() == []
        assert checked_out(db) == 0


# -- 4. the first error wins ------------------------------------------------------------------


async def test_failing_cleanup_never_replaces_the_routes_error(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A route that raises ValueError while its session's close fails: the server still gets the
    ValueError; the cleanup failure is a UserWarning and a log record with its traceback."""
    app, db = make_app(database, commit_on_exit=True)

    @app.post("/fail")
    async def fail() -> None:
        await db.session.execute(new_item("lost"))
        failing_close(db.session)
        raise ValueError("the route's own error")

    transport = httpx.ASGITransport(app=app)  # raises the app's exceptions
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with (
            pytest.warns(UserWarning, match="close failed"),
            pytest.raises(ValueError, match="the route's own error"),
        ):
            await client.post("/fail")
    [record] = cleanup_records(caplog)
    assert "close failed" in str(record.exc_info[1])  # type: ignore[index]
    assert await database.names() == []
    assert checked_out(db) == 0


@pytest.mark.parametrize("block", ["db()", "multi-session block", "db.connection()"])
async def test_failing_cleanup_never_replaces_the_blocks_error(
    database: Database, db: DBSessionMeta, caplog: pytest.LogCaptureFixture, block: str
) -> None:
    """`except ValueError` around a block still catches the user's ValueError when the rollback
    or close after it fails; that failure is reported beside it."""
    with pytest.warns(UserWarning, match="close failed"), pytest.raises(ValueError, match="own"):
        if block == "db()":
            async with db():
                await db.session.execute(new_item("lost"))
                failing_close(db.session)
                raise ValueError("the block's own error")
        elif block == "multi-session block":
            async with db(multi_sessions=True, commit_on_exit=True):
                await db.session.execute(new_item("lost"))
                failing_close(db.session)
                raise ValueError("the block's own error")
        else:
            async with db(multi_sessions=True, max_concurrent=2), db.connection() as session:
                await session.execute(new_item("lost"))
                failing_close(session)
                raise ValueError("the block's own error")
    assert len(cleanup_records(caplog)) == 1
    assert await database.names() == []
    assert checked_out(db) == 0


async def test_failing_close_after_a_failed_commit_keeps_the_commits_error(
    database: Database, db: DBSessionMeta
) -> None:
    """A commit that fails keeps its own error (IntegrityError) even when the close after it
    fails too."""
    await database.insert("taken")
    with pytest.warns(UserWarning, match="close failed"), pytest.raises(IntegrityError):
        async with db(commit_on_exit=True):
            db.session.add(Row(10**8, "taken"))  # flushed, and refused, at the commit
            failing_close(db.session)
    assert await database.names() == ["taken"]
    assert checked_out(db) == 0


# -- 5. a throttled db.gather fails fast ---------------------------------------------------------


async def test_throttled_gather_cancels_and_rolls_back_siblings_on_the_first_error(
    database: Database, db: DBSessionMeta
) -> None:
    """When one coroutine raises, the running siblings are cancelled and rolled back and the
    ones not started yet are closed, before the error reaches the caller."""
    sibling_wrote = asyncio.Event()
    started: list[str] = []

    async def linger() -> None:
        started.append("linger")
        await db.session.execute(new_item("sibling"))
        sibling_wrote.set()
        await asyncio.sleep(30)

    async def fail() -> None:
        started.append("fail")
        await sibling_wrote.wait()
        raise Boom("first error")

    async def later(name: str) -> None:
        started.append(name)
        await db.session.execute(new_item(name))

    async with asyncio.timeout(10), db(multi_sessions=True, max_concurrent=2, commit_on_exit=True):
        unstarted = [later("third"), later("fourth")]
        with pytest.raises(Boom, match="first error"):
            await db.gather(linger(), fail(), *unstarted)
        names_when_raised = await database.names()
        in_use_when_raised = checked_out(db)
    assert names_when_raised == []
    assert in_use_when_raised == 0
    assert sorted(started) == ["fail", "linger"]
    assert await database.names() == []


# -- 6. db.gather from a task holding a slot ------------------------------------------------------


async def test_gather_from_a_held_slot_runs_while_slots_are_free(
    database: Database, db: DBSessionMeta
) -> None:
    """A task inside db.connection() may db.gather() while other slots are free; it is refused
    only when every slot would be held by a task waiting in db.gather()."""

    async def write(name: str) -> str:
        await db.session.execute(new_item(name))
        return name

    block = db(multi_sessions=True, max_concurrent=3, commit_on_exit=True)
    async with asyncio.timeout(10), block, db.connection():
        results = await db.gather(write("a"), write("b"), write("c"))
    assert results == ["a", "b", "c"]
    assert await database.names() == ["a", "b", "c"]

    refused = write("never")
    entered = asyncio.Event()

    async def gather_in_slot(coroutine: Any) -> Any:
        async with db.connection():
            entered.set()
            return await db.gather(coroutine)

    async with asyncio.timeout(10), db(multi_sessions=True, max_concurrent=2):
        slow = asyncio.Event()

        async def wait_for_slow() -> None:
            await slow.wait()

        first = asyncio.create_task(gather_in_slot(wait_for_slow()))
        await entered.wait()
        with pytest.raises(ConcurrencyError, match="slot"):
            await gather_in_slot(refused)
        slow.set()
        await first
    assert refused.cr_frame is None  # closed, never run
    assert await database.names() == ["a", "b", "c"]


# -- 9. PoolTimeoutError only for a pool (or slot) that ran out of time ---------------------------


async def test_engine_pool_timeout_firing_first_is_the_one_reported(database: Database) -> None:
    """When the engine's own pool_timeout runs out before the block's, PoolTimeoutError reports
    that deadline, in .timeout and in its message."""
    async with bound(database.url, pool_size=1, max_overflow=0, pool_timeout=0.3) as db:

        async def open_block() -> BaseException | None:
            try:
                async with db(pool_timeout=5):
                    pass
            except PoolTimeoutError as exc:
                return exc
            return None

        error = await while_the_pool_is_held(db.engine, open_block())
    assert isinstance(error, PoolTimeoutError)
    assert error.timeout == 0.3
    assert "0.3s" in str(error)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    yield port
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_driver_connect_timeout_is_not_a_pool_timeout(silent_server: int) -> None:
    """A server that never answers makes the driver's own connect timeout fire: that error (a
    TimeoutError from asyncpg) comes through, not a PoolTimeoutError, although the block has a
    pool_timeout. (asyncmy and aiomysql bound only the TCP connect, which a silent server
    accepts, so MariaDB's drivers have no such timeout to report.)"""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{silent_server}/test"
    async with bound(url, connect_args={"timeout": 0.3}) as db:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's own error
            async with asyncio.timeout(4), db(pool_timeout=3):
                pass
    assert isinstance(raised.value, TimeoutError)
    assert not isinstance(raised.value, PoolTimeoutError)


# -- 10. a lifespan that cannot bind its proxy fails and raises ---------------------------------


def test_test_client_stops_when_the_proxy_cannot_be_bound(database_url: str) -> None:
    """Starlette's TestClient raises at startup, instead of waiting for ever, when another engine
    holds the app's proxy."""
    Middleware, _ = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=database_url)
    with TestClient(app):
        pass  # builds the middleware stack; the lifespan end disposes the engine
    other = Middleware(unused_app, db_url=database_url)
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            with TestClient(app):
                outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(10)
    asyncio.run(other.dispose())
    assert not thread.is_alive(), "TestClient waited for ever"
    [raised] = outcome
    assert isinstance(raised, ProxyBindingError)


# -- 12. db.connection() decides when it is entered ------------------------------------------------


async def test_connection_made_before_a_slot_and_entered_inside_it_lends_the_session(
    db: DBSessionMeta,
) -> None:
    """A db.connection() context made before its task held a slot and entered inside one gives
    back the task's session instead of waiting for its own slot."""
    async with asyncio.timeout(5), db(multi_sessions=True, max_concurrent=1):
        made_early = db.connection()
        async with db.connection() as outer, made_early as inner:
            assert (await inner.execute(text("SELECT 1"))).scalar_one() == 1
    assert inner is outer
    assert checked_out(db) == 0


async def test_connection_lends_the_session_a_task_took_from_db_session(
    database: Database, db: DBSessionMeta
) -> None:
    """A task that already has a session (from db.session) is lent it by db.connection()."""

    async def child() -> bool:
        own = db.session
        await own.execute(new_item("child"))
        async with db.connection() as lent:
            return lent is own

    async with db(multi_sessions=True, commit_on_exit=True):
        same = await asyncio.create_task(child())
    assert same
    assert await database.names() == ["child"]
    assert checked_out(db) == 0


async def test_connection_outside_a_scope_fails_when_entered() -> None:
    """db.connection() outside any scope can be made; entering it raises, as in 0.8.1."""
    _, db = create_middleware_and_session_proxy()
    context = db.connection()
    with pytest.raises(Exception, match="not bound") as raised:
        async with context:
            pass
    assert type(raised.value).__name__ == "SessionNotInitialisedError"


# -- also: module attributes and hand-built scopes ------------------------------------------------


def test_middleware_module_is_an_attribute_after_one_import() -> None:
    """`import fastapi_async_sqlalchemy` alone makes `fastapi_async_sqlalchemy.middleware.X`
    reachable, as 0.8.1 code expects."""
    code = (
        "import fastapi_async_sqlalchemy\n"
        "print(fastapi_async_sqlalchemy.middleware.SQLAlchemyMiddleware.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "SQLAlchemyMiddleware"


async def test_hand_built_scope_without_a_path_is_served(database: Database) -> None:
    """An HTTP scope built by hand without "path" goes through, with excluded paths set."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("GET", "/")
    del scope["path"]
    Middleware, _ = create_middleware_and_session_proxy()
    middleware = Middleware(app, db_url=database.url, exclude_paths=["/health"])
    try:
        await middleware(scope, receive, send)
    finally:
        await middleware.dispose()
    assert [message.get("status") for message in sent] == [204, None]


async def test_failed_disposal_at_shutdown_is_passed_on_then_raised(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the owned engine cannot be disposed at the lifespan end, the server still hears
    `lifespan.shutdown.complete`, then the lifespan raises the disposal error (as in 0.8.1),
    and it is logged with its traceback."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    Middleware, _ = create_middleware_and_session_proxy()
    middleware = Middleware(app, db_url=database_url)

    def failing_dispose(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dispose failed")

    monkeypatch.setattr(middleware.engine.sync_engine, "dispose", failing_dispose)
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    heard: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        heard.append(message["type"])

    try:
        with pytest.raises(RuntimeError, match="dispose failed"):
            await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    finally:
        monkeypatch.undo()
        await middleware.dispose()
    assert heard == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert any(record.exc_info for record in caplog.records if record.name == LOGGER)


# -- found in review ------------------------------------------------------------------------------


async def test_connection_inside_a_throttled_gather_child_uses_its_slot(
    database: Database, db: DBSessionMeta
) -> None:
    """A db.gather() child whose first database access is db.connection() is lent its own
    slot's session, instead of waiting for a second slot (max_concurrent=1 would never give
    one)."""

    async def work(number: int) -> int:
        async with db.connection() as session:
            await session.execute(new_item(f"row-{number}"))
        return number

    async with asyncio.timeout(10), db(multi_sessions=True, max_concurrent=1, commit_on_exit=True):
        results = await db.gather(work(1), work(2))
    assert results == [1, 2]
    assert await database.names() == ["row-1", "row-2"]


async def test_sibling_finishing_as_a_throttled_gather_fails_is_not_committed(
    database: Database, db: DBSessionMeta
) -> None:
    """A sibling that finishes while the failing child is still rolling back is rolled back
    too: nothing of a fail-fast gather is kept."""
    failing = asyncio.Event()

    async def fail() -> None:
        await db.session.execute(text("SELECT 1"))
        failing.set()
        raise Boom("first error")

    async def finish_meanwhile() -> None:
        await db.session.execute(new_item("sibling"))
        await failing.wait()

    block = db(multi_sessions=True, max_concurrent=2, commit_on_exit=True)
    with pytest.raises(Boom):
        async with asyncio.timeout(10), block:
            await db.gather(fail(), finish_meanwhile())
    assert await database.names() == []


@pytest.mark.parametrize("how", ["db.session", "db.connection()"])
async def test_cut_off_task_that_swallows_the_cancel_is_not_committed(
    database: Database, db: DBSessionMeta, how: str
) -> None:
    """A task cut off at block exit that catches the CancelledError and returns normally still
    has its work rolled back, as the block's error says."""
    wrote = asyncio.Event()

    async def stubborn() -> None:
        try:
            if how == "db.session":
                await db.session.execute(new_item("cut-off"))
                wrote.set()
                await asyncio.sleep(30)
            else:
                async with db.connection() as session:
                    await session.execute(new_item("cut-off"))
                    wrote.set()
                    await asyncio.sleep(30)
        except asyncio.CancelledError:
            return  # swallowed

    tasks: list[asyncio.Task[None]] = []
    with pytest.raises(ConcurrencyError, match="rolled back"):
        async with asyncio.timeout(10), db(multi_sessions=True, commit_on_exit=True):
            tasks.append(asyncio.create_task(stubborn()))
            await wrote.wait()
    assert tasks[0].done()
    assert await database.names() == []
    assert checked_out(db) == 0


@pytest.mark.parametrize("return_exceptions", [False, True])
@pytest.mark.parametrize("throttle", [{}, {"max_concurrent": 2}])
async def test_gather_cancelled_before_its_children_ran_leaves_no_unawaited_coroutine(
    db: DBSessionMeta, throttle: dict[str, Any], return_exceptions: bool
) -> None:
    """A block cancelled right after calling db.gather() closes the coroutines no child ever
    started (a "never awaited" warning is an error in this suite)."""
    coroutines: list[Any] = []

    async def block() -> None:
        async with db(multi_sessions=True, **throttle):
            coroutines.extend([asyncio.sleep(0), asyncio.sleep(0)])
            await db.gather(*coroutines, return_exceptions=return_exceptions)

    task = asyncio.create_task(block())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gc.collect()
    assert all(coroutine.cr_frame is None for coroutine in coroutines)
