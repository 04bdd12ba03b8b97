"""Explicit scopes: `async with db():` in startup code, scripts, generators and other tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import Database, items, new_item, serve, unused_app
from fastapi import FastAPI
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    MissingSessionError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """The error a block raises on purpose."""


@pytest.fixture
async def db(database: Database) -> AsyncIterator[DBSessionMeta]:
    """A fresh proxy bound by a middleware constructed outside any app, as a script would."""
    Middleware, proxy = create_middleware_and_session_proxy()
    middleware = Middleware(app=unused_app, db_url=database.url)
    try:
        yield proxy
    finally:
        await middleware.dispose()


def record_checkouts(db: DBSessionMeta) -> list[object]:
    """A list that grows by one each time the proxy's engine checks out a connection."""
    checkouts: list[object] = []
    event.listen(db.engine.sync_engine, "checkout", lambda *args: checkouts.append(args))
    return checkouts


async def count_in(session: AsyncSession) -> int:
    """The number of rows of ``items`` that ``session`` can see."""
    return (await session.execute(select(func.count()).select_from(items))).scalar_one()


async def test_explicit_scope_works_outside_requests(database: Database) -> None:
    """Once the middleware is constructed, `async with db():` reads and writes without an app."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(app=unused_app, db_url=database.url)
    try:
        async with db():
            await db.session.execute(new_item("scripted"))
            await db.session.commit()
        assert db.engine.pool.checkedout() == 0
    finally:
        await middleware.dispose()
    assert await database.names() == ["scripted"]


async def test_entering_a_scope_gives_back_the_proxy(db: DBSessionMeta) -> None:
    """`async with db() as x` binds x to the proxy itself, as the 0.8 releases did."""
    async with db() as proxy:
        assert proxy is db
        await proxy.session.execute(text("SELECT 1"))
    assert db.engine.pool.checkedout() == 0


@pytest.mark.parametrize("user_commits", [False, True])
@pytest.mark.parametrize("raises", [False, True])
@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_block_outcome_decides_what_is_committed(
    db: DBSessionMeta, database: Database, commit_on_exit: bool, raises: bool, user_commits: bool
) -> None:
    """A block commits on exit only with commit_on_exit and no error; its error propagates as is."""
    error = Boom("block failed")

    async def block() -> None:
        async with db(commit_on_exit=commit_on_exit):
            await db.session.execute(new_item("first"))
            if user_commits:
                await db.session.commit()
            await db.session.execute(new_item("second"))
            if raises:
                raise error

    if raises:
        with pytest.raises(Boom) as raised:
            await block()
        assert raised.value is error
    else:
        await block()

    if commit_on_exit and not raises:
        expected = ["first", "second"]
    else:
        expected = ["first"] if user_commits else []
    assert db.engine.pool.checkedout() == 0
    assert await database.names() == expected


@pytest.mark.parametrize("outer_commits", [True, False])
async def test_nested_blocks_have_their_own_sessions_and_restore_the_outer_one(
    db: DBSessionMeta, database: Database, outer_commits: bool
) -> None:
    """An inner block has its own session and transaction; the outer one is current again after."""
    async with db(commit_on_exit=outer_commits):
        outer = db.session
        await outer.execute(new_item("outer"))
        async with db(commit_on_exit=True):
            inner = db.session
            assert inner is not outer
            assert await count_in(inner) == 0  # the outer write is not visible: another transaction
        assert db.session is outer
        assert await database.names() == []  # the inner commit did not commit the outer write
        assert await count_in(db.session) == 1  # the outer transaction is still open
    assert db.engine.pool.checkedout() == 0
    assert await database.names() == (["outer"] if outer_commits else [])


async def test_session_args_of_a_block_apply_to_its_session_only(db: DBSessionMeta) -> None:
    """`db(session_args=...)` configures that block's session; other blocks keep the defaults."""
    async with db(session_args={"expire_on_commit": True}):
        assert db.session.sync_session.expire_on_commit is True
    async with db():
        assert db.session.sync_session.expire_on_commit is False


class AuditedSession(AsyncSession):
    """A user's own session class."""


async def test_block_sessions_can_be_bound_to_a_connection_of_the_caller(
    db: DBSessionMeta, database: Database
) -> None:
    """session_args={"bind": connection} runs the block in the caller's outer transaction."""
    async with db.engine.connect() as connection:
        outer = await connection.begin()
        async with db(session_args={"bind": connection}):
            assert db.session.bind is connection
            await db.session.execute(new_item("inside"))
            await db.session.flush()
        await outer.rollback()  # the caller's transaction decides, as a test's savepoint would
    assert await database.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_session_class_can_be_chosen_per_block(db: DBSessionMeta, database: Database) -> None:
    """`session_args={"class_": ...}` gives the block a session of that class, which works."""
    async with db(session_args={"class_": AuditedSession}, commit_on_exit=True):
        assert type(db.session) is AuditedSession
        await db.session.execute(new_item("audited"))
    async with db():
        assert type(db.session) is not AuditedSession
    assert db.engine.pool.checkedout() == 0
    assert await database.names() == ["audited"]


async def test_block_session_args_merge_over_the_middleware_ones(database: Database) -> None:
    """A block's session_args override the middleware's one by one, keeping the rest."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        app=unused_app, db_url=database.url, session_args={"autoflush": False, "info": {"a": 1}}
    )
    try:
        async with db(session_args={"expire_on_commit": True}):
            session = db.session.sync_session
            assert (session.autoflush, session.expire_on_commit) == (False, True)
            assert session.info == {"a": 1}
    finally:
        await middleware.dispose()


async def test_block_that_never_touches_the_session_checks_out_no_connection(
    db: DBSessionMeta,
) -> None:
    """Entering and leaving a block, even with commit_on_exit, costs no connection."""
    checkouts = record_checkouts(db)
    async with db(commit_on_exit=True):
        pass
    with pytest.raises(Boom):
        async with db():
            raise Boom
    assert checkouts == []


async def test_block_inside_a_route_has_a_session_separate_from_the_request(
    database: Database,
) -> None:
    """In a route, `async with db():` opens its own session and commits independently."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=database.url)  # the request itself never commits
    seen: dict[str, bool] = {}

    @app.post("/write")
    async def write() -> dict[str, bool]:
        request_session = db.session
        async with db(commit_on_exit=True):
            seen["separate"] = db.session is not request_session
            await db.session.execute(new_item("explicit"))
        seen["restored"] = db.session is request_session
        await db.session.execute(new_item("request"))
        return {"ok": True}

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert seen == {"separate": True, "restored": True}
    assert await database.names() == ["explicit"]


@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_generator_closed_by_another_task_ends_its_block_cleanly(
    db: DBSessionMeta, database: Database, commit_on_exit: bool
) -> None:
    """An async generator's block exited from another task rolls back without a ContextVar error."""

    async def rows() -> AsyncGenerator[int, None]:
        async with db(commit_on_exit=commit_on_exit):
            await db.session.execute(new_item("streamed"))
            yield 1
            yield 2

    generator = rows()
    assert await generator.__anext__() == 1
    assert db.engine.pool.checkedout() == 1

    async def close_elsewhere() -> type[BaseException]:
        await generator.aclose()
        try:
            db.session  # noqa: B018 - which error the read raises is the point
        except MissingSessionError as exc:
            return type(exc)
        raise AssertionError("the closed block's session is still current in the closing task")

    assert await asyncio.create_task(close_elsewhere()) is MissingSessionError
    assert db.engine.pool.checkedout() == 0
    assert await database.names() == []  # left early: the block did not end normally


async def test_session_kept_past_its_block_cannot_reopen_a_connection(
    db: DBSessionMeta,
) -> None:
    """A session object captured in a block raises after the block, and checks out nothing."""
    async with db():
        captured = db.session
        await captured.execute(text("SELECT 1"))
    checkouts = record_checkouts(db)

    with pytest.raises(InvalidRequestError, match="closed"):
        await captured.execute(text("SELECT 1"))
    with pytest.raises(MissingSessionError):
        db.session  # noqa: B018
    assert checkouts == []
    assert db.engine.pool.checkedout() == 0


async def test_concurrent_tasks_each_get_their_own_block(
    db: DBSessionMeta, database: Database
) -> None:
    """Two tasks in overlapping blocks use separate sessions: one commits, the other rolls back."""
    a_entered, b_entered, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sessions: dict[str, AsyncSession] = {}

    async def task_a() -> None:
        async with db(commit_on_exit=True):
            sessions["a"] = db.session
            a_entered.set()
            await b_entered.wait()
            await db.session.execute(new_item("a"))
            assert db.session is sessions["a"]
        a_done.set()

    async def task_b() -> None:
        async with db(commit_on_exit=True):
            sessions["b"] = db.session
            b_entered.set()
            await a_entered.wait()
            await a_done.wait()  # a's block commits while b's is still open
            assert db.session is sessions["b"]
            await db.session.execute(new_item("b"))
            raise Boom

    results = await asyncio.gather(task_a(), task_b(), return_exceptions=True)

    assert results[0] is None
    assert isinstance(results[1], Boom)

    assert sessions["a"] is not sessions["b"]
    with pytest.raises(MissingSessionError):
        db.session  # noqa: B018 - neither task's block leaked into this one
    assert db.engine.pool.checkedout() == 0
    assert await database.names() == ["a"]


async def test_lifespan_startup_and_shutdown_can_use_explicit_blocks(database: Database) -> None:
    """A FastAPI lifespan writes at startup and at shutdown with `async with db():`."""
    Middleware, db = create_middleware_and_session_proxy()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("at-startup"))
        yield
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("at-shutdown"))

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(Middleware, db_url=database.url)

    @app.get("/names")
    async def names() -> list[str]:
        return list((await db.session.execute(select(items.c.name))).scalars())

    async with serve(app) as client:
        response = await client.get("/names")
        assert db.engine.pool.checkedout() == 0

    assert response.json() == ["at-startup"]
    assert await database.names() == ["at-shutdown", "at-startup"]


@pytest.mark.parametrize("when", ["while-the-insert-runs", "after-the-insert"])
async def test_cancelled_block_rolls_back_and_returns_its_connection(
    db: DBSessionMeta, database: Database, when: str
) -> None:
    """A task cancelled inside a commit_on_exit block keeps nothing and leaks no connection."""
    written = asyncio.Event()

    def cancel_during_insert(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # delivered while the driver runs the INSERT

    if when == "while-the-insert-runs":
        event.listen(db.engine.sync_engine, "before_cursor_execute", cancel_during_insert)

    async def work() -> None:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("cancelled"))
            written.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(work())
    if when == "after-the-insert":
        await written.wait()
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert written.is_set() == (when == "after-the-insert")
    assert db.engine.pool.checkedout() == 0
    assert await database.names() == []
