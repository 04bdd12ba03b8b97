"""The testing kit's isolation: `isolated()` / `db_isolation` roll back whatever the app wrote.

Each test runs on SQLite (a file and memory), PostgreSQL (asyncpg and psycopg) and MariaDB
(asyncmy and aiomysql). The app gets the engine as ``custom_engine`` (an in-memory SQLite
database lives in its engine), and what was really committed is read outside ``isolated()``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SERVER_URLS, Row, _server_reachable, items, metadata, new_item
from fastapi import BackgroundTasks, FastAPI, HTTPException
from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, InvalidRequestError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from fastapi_async_sqlalchemy import DBSessionMeta, create_middleware_and_session_proxy
from fastapi_async_sqlalchemy.testing import (
    IsolationError,
    assert_num_queries,
    capture_on_commit_callbacks,
    isolated,
)

pytestmark = pytest.mark.anyio

NAMES = select(items.c.name).order_by(items.c.name)
COUNT = select(func.count()).select_from(items)

_SERVERS = {
    "postgresql+asyncpg": SERVER_URLS["postgresql"],
    "postgresql+psycopg": SERVER_URLS["postgresql"].replace("+asyncpg", "+psycopg"),
    "mariadb+asyncmy": SERVER_URLS["mariadb"],
    "mariadb+aiomysql": SERVER_URLS["mariadb"].replace("+asyncmy", "+aiomysql"),
}
_SELECTED = os.environ.get("TEST_DATABASES", "sqlite,postgresql,mariadb").split(",")
TARGETS = [
    name
    for name in ("sqlite-file", "sqlite-memory", *_SERVERS)
    if name.split("-")[0].split("+")[0] in _SELECTED
]


@dataclass
class Target:
    """One database and driver: the app's engine, with a fresh ``items`` table."""

    name: str
    engine: AsyncEngine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def committed(self) -> list[str]:
        """The names really in the table (read outside any isolation)."""
        async with self.engine.connect() as connection:
            return [row[0] for row in await connection.execute(NAMES)]


@pytest.fixture(params=TARGETS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    name: str = request.param
    if name == "sqlite-file":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'kit.sqlite3'}")
    elif name == "sqlite-memory":
        engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    else:
        url = _SERVERS[name]
        if not _server_reachable(url):
            if os.environ.get("CI"):
                pytest.fail(f"{name} is not reachable: CI must test every database")
            pytest.skip(f"{name} is not reachable")
        engine = create_async_engine(url)
    async with engine.begin() as connection:
        await _bounded_locks(connection)
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)
    yield Target(name, engine)
    async with engine.begin() as connection:
        await _bounded_locks(connection)  # a test that leaked a transaction fails, not hangs
        await connection.run_sync(metadata.drop_all)
    await engine.dispose()


async def _bounded_locks(connection: Any) -> None:
    name = connection.dialect.name
    if name == "postgresql":
        await connection.execute(text("SET LOCAL lock_timeout = '20s'"))
    elif name in ("mysql", "mariadb"):
        await connection.execute(text("SET SESSION lock_wait_timeout = 20"))


def app_on(target: Target, **options: Any) -> tuple[FastAPI, DBSessionMeta]:
    """A FastAPI app whose middleware (bound at once) uses the target's engine."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, custom_engine=target.engine, commit_on_exit=True, **options)
    app.middleware_stack = app.build_middleware_stack()  # bind the proxy now, once

    @app.post("/items/{name}")
    async def add(name: str) -> dict[str, str]:
        await db.session.execute(new_item(name))
        if name.startswith("refused"):
            raise HTTPException(409, "refused")
        return {"added": name}

    @app.get("/items")
    async def names() -> list[str]:
        return [row[0] for row in await db.session.execute(NAMES)]

    return app, db


@asynccontextmanager
async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def names_in(db: DBSessionMeta) -> list[str]:
    async with db():
        return [row[0] for row in await db.session.execute(NAMES)]


def checked_out(target: Target) -> int:
    if target.name == "sqlite-memory":
        return 0  # StaticPool keeps its one connection and counts nothing
    return int(target.engine.pool.checkedout())  # type: ignore[attr-defined]


# -- what the app commits is seen in the test, and gone after it --------------------------------


async def test_a_request_commit_is_seen_by_the_test_and_gone_after_it(target: Target) -> None:
    app, db = app_on(target)
    async with client_for(app) as client:
        async with isolated():
            assert (await client.post("/items/one")).status_code == 200
            assert await names_in(db) == ["one"]
            assert (await client.get("/items")).json() == ["one"]
        assert await target.committed() == []
        assert checked_out(target) == 0
        async with isolated():  # the next test starts from nothing
            assert (await client.get("/items")).json() == []


async def test_an_app_rollback_keeps_the_rows_the_test_seeded(target: Target) -> None:
    app, db = app_on(target)
    async with client_for(app) as client, isolated():
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("seed"))
        assert (await client.post("/items/refused")).status_code == 409  # rolled back
        assert (await client.get("/items")).json() == ["seed"]
    assert await target.committed() == []


async def test_an_error_in_the_app_rolls_back_only_the_app(target: Target) -> None:
    app, db = app_on(target)

    @app.post("/fails")
    async def fails() -> None:
        await db.session.execute(new_item("half"))
        raise RuntimeError("the app fails")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client, isolated():
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("seed"))
        assert (await client.post("/fails")).status_code == 500
        assert await names_in(db) == ["seed"]
    assert await target.committed() == []


async def test_blocks_and_requests_in_turn(target: Target) -> None:
    app, db = app_on(target)
    async with client_for(app) as client, isolated():
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("first"))
        assert (await client.post("/items/second")).status_code == 200
        async with db(commit_on_exit=True):
            assert [row[0] for row in await db.session.execute(NAMES)] == ["first", "second"]
            await db.session.execute(new_item("third"))
        async with db():  # not committed: rolled back at the block's end
            await db.session.execute(new_item("dropped"))
        assert (await client.get("/items")).json() == ["first", "second", "third"]
    assert await target.committed() == []


async def test_the_apps_own_savepoints(target: Target) -> None:
    """begin_nested() committed, rolled back, and failing with IntegrityError then more work."""
    app, db = app_on(target)

    @app.post("/nested")
    async def nested() -> list[str]:
        session = db.session
        async with session.begin_nested():
            await session.execute(new_item("kept"))
        savepoint = await session.begin_nested()
        await session.execute(new_item("undone"))
        await savepoint.rollback()
        try:
            async with session.begin_nested():
                await session.execute(new_item("kept"))  # a duplicate name
        except IntegrityError:
            pass
        await session.execute(new_item("after"))
        return [row[0] for row in await session.execute(NAMES)]

    async with client_for(app) as client, isolated():
        response = await client.post("/nested")
        assert response.status_code == 200
        assert response.json() == ["after", "kept"]
        assert (await client.get("/items")).json() == ["after", "kept"]
    assert await target.committed() == []


async def test_query_counts_see_only_the_apps_statements(target: Target) -> None:
    """The test connection opens inside the block (its BEGIN or START TRANSACTION, and the
    savepoints): only the request's INSERT and the block's SELECT are counted."""
    app, db = app_on(target)
    async with client_for(app) as client, isolated():
        with assert_num_queries(2) as sent:
            assert (await client.post("/items/counted")).status_code == 200
            assert await names_in(db) == ["counted"]
    assert [query.statement.split()[0].upper() for query in sent] == ["INSERT", "SELECT"]


async def test_expire_on_commit_as_in_production(target: Target) -> None:
    _app, db = app_on(target, session_args={"expire_on_commit": True})
    async with isolated(), db():
        row = Row(id=1, name="fresh")
        db.session.add(row)
        await db.session.commit()
        assert inspect(row).expired
        await db.session.refresh(row)
        assert row.name == "fresh"
    assert await target.committed() == []


# -- concurrency inside the app ------------------------------------------------------------------


async def test_gathered_children_take_turns_and_one_failing_undoes_only_its_work(
    target: Target,
) -> None:
    app, db = app_on(target)

    async def child(name: str) -> int:
        await db.session.execute(new_item(name))
        await asyncio.sleep(0.01)  # the others get their chance to run meanwhile
        if name == "second":
            raise ValueError("the second child fails")
        return int((await db.session.execute(COUNT)).scalar_one())

    @app.post("/gather")
    async def gather() -> list[str]:
        await db.session.execute(new_item("route"))  # the request's session, suspended below
        async with db(multi_sessions=True, commit_on_exit=True):
            results = await db.gather(
                child("first"), child("second"), child("third"), return_exceptions=True
            )
        return [repr(result) for result in results]

    async with client_for(app) as client, isolated():
        response = await client.post("/gather")
        assert response.status_code == 200
        assert response.json() == ["2", "ValueError('the second child fails')", "3"]
        assert (await client.get("/items")).json() == ["first", "route", "third"]
    assert await target.committed() == []


async def test_gathered_reads_with_a_limit(target: Target) -> None:
    _app, db = app_on(target)

    async def read() -> int:
        return int((await db.session.execute(COUNT)).scalar_one())

    async with isolated():
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("one"))
        async with db(multi_sessions=True, max_concurrent=2):
            assert await db.gather(*(read() for _ in range(5))) == [1] * 5
    assert await target.committed() == []
    assert checked_out(target) == 0


async def test_a_background_task_write_is_rolled_back(target: Target) -> None:
    app, db = app_on(target)

    async def later() -> None:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("background"))

    @app.post("/with-background")
    async def with_background(background: BackgroundTasks) -> dict[str, str]:
        await db.session.execute(new_item("route"))
        background.add_task(later)
        return {"ok": "yes"}

    async with client_for(app) as client, isolated():
        assert (await client.post("/with-background")).status_code == 200
        assert (await client.get("/items")).json() == ["background", "route"]
    assert await target.committed() == []


async def test_a_task_left_running_is_reported(target: Target) -> None:
    _app, db = app_on(target)
    release, wrote = asyncio.Event(), asyncio.Event()

    async def lingering() -> None:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("lingering"))
            wrote.set()
            await release.wait()

    try:
        with pytest.raises(IsolationError, match="still open when the test ended") as raised:
            async with isolated():
                task = asyncio.create_task(lingering())
                await asyncio.wait_for(wrote.wait(), 10)
        assert __file__.rsplit("/", 1)[-1] in str(raised.value)  # where its transaction began
    finally:
        release.set()
    with pytest.raises(InvalidRequestError, match="inactive"):  # its transaction is gone
        await task
    assert await target.committed() == []
    assert checked_out(target) == 0


async def test_a_cycle_ends_in_a_clear_error(target: Target) -> None:
    """A task holding the connection waits for a sibling that waits for the connection."""
    _app, db = app_on(target)
    first_holds, second_wrote = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        await db.session.execute(new_item("first"))
        first_holds.set()
        await asyncio.wait_for(second_wrote.wait(), 5)  # holds its transaction meanwhile

    async def second() -> None:
        await asyncio.wait_for(first_holds.wait(), 5)
        await db.session.execute(new_item("second"))
        second_wrote.set()

    async with isolated(turn_timeout=0.3):
        with pytest.raises(IsolationError, match=r"waited 0\.3s for its turn") as raised:
            async with db(multi_sessions=True):
                await asyncio.gather(first(), second())
        assert "task waiting on work that waits on it" in str(raised.value)
    assert await target.committed() == []
    assert checked_out(target) == 0


async def test_two_proxies_two_databases(target: Target, tmp_path: Path) -> None:
    app, db = app_on(target)
    other = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'other.sqlite3'}")
    async with other.begin() as connection:
        await connection.run_sync(metadata.create_all)
    OtherMiddleware, other_db = create_middleware_and_session_proxy()
    OtherMiddleware(app=app, custom_engine=other)

    @app.post("/both/{name}")
    async def both(name: str) -> None:
        await db.session.execute(new_item(name))
        async with other_db(commit_on_exit=True):
            await other_db.session.execute(new_item(name))

    async with client_for(app) as client, isolated():
        assert (await client.post("/both/twice")).status_code == 200
        assert await names_in(db) == ["twice"]
        assert await names_in(other_db) == ["twice"]
    assert await target.committed() == []
    async with other.connect() as connection:
        assert (await connection.execute(COUNT)).scalar_one() == 0
    await other.dispose()


async def test_a_proxy_bound_during_the_test_is_covered(target: Target) -> None:
    async with isolated():
        app, _db = app_on(target)  # built (and bound) inside
        async with client_for(app) as client:
            assert (await client.post("/items/inside")).status_code == 200
            assert (await client.get("/items")).json() == ["inside"]
    assert await target.committed() == []


# -- breaches --------------------------------------------------------------------------------


async def test_a_commit_of_the_test_connection_is_refused(target: Target) -> None:
    _app, db = app_on(target)
    with pytest.raises(IsolationError, match="COMMIT of the test transaction itself"):
        async with isolated(), db():
            await db.session.execute(new_item("escaping"))
            connection = await db.session.connection()
            await connection.commit()
    assert await target.committed() == []
    assert checked_out(target) == 0


async def test_a_commit_statement_is_refused(target: Target) -> None:
    _app, db = app_on(target)
    with pytest.raises(IsolationError, match="COMMIT statement"):
        async with isolated(), db():
            await db.session.execute(new_item("escaping"))
            await db.session.execute(text("COMMIT"))
    assert await target.committed() == []


async def test_a_connection_of_its_own_is_refused_and_reported(target: Target) -> None:
    _app, db = app_on(target)
    with pytest.raises(IsolationError, match="checked out of an isolated engine") as raised:
        async with isolated():
            with pytest.raises(IsolationError, match="on a connection of its own"):
                async with db.engine.begin() as connection:
                    await connection.execute(new_item("escaping"))
    assert "test_testing_isolation.py" in str(raised.value)
    assert await target.committed() == []
    assert checked_out(target) == 0


def on(*kinds: str) -> pytest.MarkDecorator:
    """Only the targets of these databases (a behaviour specific to them)."""
    chosen: list[Any] = [name for name in TARGETS if name.split("-")[0].split("+")[0] in kinds]
    if not chosen:
        chosen = [pytest.param(None, marks=pytest.mark.skip(reason=f"{kinds} not selected"))]
    return pytest.mark.parametrize("target", chosen, indirect=True)


@on("mariadb")
async def test_ddl_on_mariadb_is_refused(target: Target) -> None:
    _app, db = app_on(target)
    with pytest.raises(IsolationError, match="commits the transaction by itself"):
        async with isolated(), db():
            await db.session.execute(new_item("escaping"))
            await db.session.execute(text("CREATE TABLE kit_extra (id INT)"))
    assert await target.committed() == []


@on("sqlite")
async def test_executescript_on_sqlite_is_reported(target: Target) -> None:
    _app, db = app_on(target)
    # The block's rollback then fails (the savepoint went with the commit): that error
    # propagates, and the report comes with it as a note.
    with pytest.raises(OperationalError, match="no such savepoint") as raised:
        async with isolated(), db():
            await db.session.execute(new_item("escaping"))
            connection = await db.session.connection()
            raw = await connection.get_raw_connection()
            await raw.driver_connection.executescript("SELECT 1;")  # type: ignore[union-attr]
    assert "The test transaction was ended early" in " ".join(raised.value.__notes__)
    assert await target.committed() == ["escaping"]  # it did escape: that is the report
    async with target.engine.begin() as connection:
        await connection.execute(items.delete())


async def test_sessions_used_after_the_block_are_refused(target: Target) -> None:
    _app, db = app_on(target)
    async with isolated():
        block = db()
        await block.__aenter__()
        session = db.session
    with pytest.raises(IsolationError, match="used after the block ended"):
        await session.execute(COUNT)
    await block.__aexit__(None, None, None)
    assert checked_out(target) == 0


async def test_blocks_do_not_nest() -> None:
    async with isolated():
        with pytest.raises(IsolationError, match="do not nest"):
            async with isolated():
                pass


# -- what the review of the turns found ---------------------------------------------------------


async def test_a_task_started_before_its_parents_first_statement(target: Target) -> None:
    """The child stacks on its parent's transaction: the loop's task factory saw who started it."""
    _app, db = app_on(target)

    async def log(name: str) -> None:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item(f"log-{name}"))

    async def branch(name: str) -> None:
        task = asyncio.create_task(log(name))  # before this task's first statement
        await db.session.execute(new_item(name))
        await task  # the parent holds its transaction meanwhile

    async with isolated(turn_timeout=3):
        async with db(multi_sessions=True, commit_on_exit=True):
            await db.gather(branch("a"), branch("b"))
        assert await names_in(db) == ["a", "b", "log-a", "log-b"]
    assert await target.committed() == []


async def test_task_groups_in_concurrent_requests(target: Target) -> None:
    app, db = app_on(target)

    async def audit(name: str) -> None:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item(f"audit-{name}"))

    @app.post("/grouped/{name}")
    async def grouped(name: str) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(audit(name))
            await db.session.execute(new_item(name))

    async with client_for(app) as client, isolated(turn_timeout=3):
        responses = await asyncio.gather(client.post("/grouped/p1"), client.post("/grouped/p2"))
        assert [response.status_code for response in responses] == [200, 200]
        assert await names_in(db) == ["audit-p1", "audit-p2", "p1", "p2"]
    assert await target.committed() == []


async def test_one_tasks_sessions_ending_out_of_order_are_refused_at_once(
    target: Target,
) -> None:
    _app, db = app_on(target)
    with pytest.raises(IsolationError, match="must end in the reverse order") as raised:
        async with isolated(turn_timeout=5), db(commit_on_exit=True):
            outer = db.session
            async with db(commit_on_exit=True):
                await db.session.execute(new_item("audit"))
                await outer.execute(new_item("order"))  # the outer transaction begins now
    assert "waited" not in str(raised.value)  # refused at once, no wait for a turn
    assert await target.committed() == []
    assert checked_out(target) == 0


async def test_a_rollback_statement_is_refused(target: Target) -> None:
    _app, db = app_on(target)
    with pytest.raises(IsolationError, match="ROLLBACK statement"):
        async with isolated(), db():
            await db.session.execute(new_item("before"))
            await db.session.execute(text("ROLLBACK"))
    assert await target.committed() == []


async def test_a_task_writing_after_the_block_is_refused(target: Target) -> None:
    _app, db = app_on(target)
    release = asyncio.Event()
    failures: list[BaseException] = []

    async def receipt() -> None:
        await release.wait()
        try:
            async with db(commit_on_exit=True):
                await db.session.execute(new_item("receipt"))
        except IsolationError as error:
            failures.append(error)

    async with isolated():
        task = asyncio.create_task(receipt())  # fire and forget
    release.set()
    await task
    assert len(failures) == 1
    assert "used the database after the block ended" in str(failures[0])
    assert await target.committed() == []
    assert checked_out(target) == 0
    async with db(commit_on_exit=True):  # the test's own task is not refused
        await db.session.execute(new_item("after"))
    assert await target.committed() == ["after"]


@on("postgresql", "mariadb")
async def test_a_statement_cancelled_midway_ends_the_test_clearly(target: Target) -> None:
    _app, db = app_on(target)
    pause = "SELECT pg_sleep(1)" if target.dialect == "postgresql" else "SELECT SLEEP(1)"
    with pytest.raises(IsolationError, match="invalidated the test connection"):
        async with isolated():
            async with db(commit_on_exit=True):
                await db.session.execute(new_item("seed"))
            with pytest.raises(TimeoutError):
                async with db():
                    await asyncio.wait_for(db.session.execute(text(pause)), 0.2)
            async with db():  # the test transaction is gone: said so, at once
                await db.session.execute(COUNT)
    assert await target.committed() == []
    assert checked_out(target) == 0


@on("postgresql")
async def test_a_failed_savepoint_leaves_no_turn_behind(target: Target) -> None:
    """After an error PostgreSQL refuses new savepoints until a rollback: the refused one
    takes no place on the stack, and the request's own rollback is not kept waiting."""
    app, db = app_on(target)

    @app.post("/taken/{name}")
    async def taken(name: str) -> None:
        try:
            await db.session.execute(new_item(name))
            await db.session.execute(new_item(name))  # a duplicate name
        except IntegrityError:
            try:
                async with db(commit_on_exit=True):  # refused: the transaction is aborted
                    await db.session.execute(new_item("audit"))
            except Exception:
                pass
            raise HTTPException(409, "taken") from None

    async with client_for(app) as client, isolated(turn_timeout=3):
        assert (await client.post("/taken/x")).status_code == 409
        assert await names_in(db) == []
    assert await target.committed() == []


@pytest.mark.parametrize("target", [t for t in TARGETS if t == "sqlite-file"], indirect=True)
async def test_apps_with_sqlites_savepoint_recipe(target: Target) -> None:
    """An app that applies SQLAlchemy's SQLite recipe itself (its own BEGIN) works the same."""
    sync_engine = target.engine.sync_engine

    def no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    await target.engine.dispose()  # the connect listener applies to new connections
    event.listen(sync_engine, "connect", no_driver_transactions)
    event.listen(sync_engine, "begin", begin)
    try:
        app, _ = app_on(target)
        async with client_for(app) as client, isolated():
            assert (await client.post("/items/one")).status_code == 200
            assert (await client.get("/items")).json() == ["one"]
        assert await target.committed() == []
    finally:
        event.remove(sync_engine, "connect", no_driver_transactions)
        event.remove(sync_engine, "begin", begin)


@on("mariadb")
async def test_implicit_commits_behind_a_comment_and_temporary_tables(target: Target) -> None:
    _app, db = app_on(target)
    async with isolated(), db():
        await db.session.execute(text("CREATE OR REPLACE TEMPORARY TABLE kit_temp (id INT)"))
        await db.session.execute(text("DROP TEMPORARY TABLE kit_temp"))
    with pytest.raises(IsolationError, match="commits the transaction by itself"):
        async with isolated(), db():
            await db.session.execute(text("/* cleanup */ TRUNCATE TABLE items"))


# -- many tests in a row ----------------------------------------------------------------------


async def test_two_hundred_isolated_tests_leave_nothing_behind(target: Target) -> None:
    app, _db = app_on(target)
    async with client_for(app) as client:
        for number in range(200):
            async with isolated():
                assert (await client.post(f"/items/n{number}")).status_code == 200
                assert (await client.get("/items")).json() == [f"n{number}"]
            assert checked_out(target) == 0
    assert await target.committed() == []
    if target.dialect == "postgresql":
        async with target.engine.connect() as connection:
            sessions = await connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            )
            assert sessions.scalar_one() <= 2  # this one, and at most one idle in the pool


# -- on-commit callbacks, the pytest plugin, TestClient -----------------------------------------


async def test_capture_on_commit_callbacks(target: Target) -> None:
    _app, db = app_on(target)
    ran: list[str] = []

    async def notify(name: str) -> None:
        ran.append(name)
        db.on_commit(lambda: ran.append(f"{name} again"))  # registered by a callback

    async with isolated():
        async with capture_on_commit_callbacks() as callbacks:
            async with db(commit_on_exit=True):
                db.on_commit(lambda: notify("committed"))
                await db.session.execute(new_item("one"))
            async with db():  # rolled back: its callback never appears
                db.on_commit(lambda: notify("rolled back"))
                await db.session.execute(new_item("two"))
        assert len(callbacks) == 1
        assert ran == []
        async with capture_on_commit_callbacks(execute=True) as callbacks:
            async with db(commit_on_exit=True):
                db.on_commit(lambda: notify("executed"))
                await db.session.execute(new_item("three"))
            assert ran == []  # not before the block ends
        assert ran == ["executed", "executed again"]
        with pytest.raises(ZeroDivisionError):
            async with capture_on_commit_callbacks(execute=True), db(commit_on_exit=True):
                db.on_commit(lambda: 1 / 0)
        async with db(commit_on_exit=True):  # outside the block callbacks run again
            db.on_commit(lambda: ran.append("after"))
        assert ran[-1] == "after"
    assert await target.committed() == []


def test_starlette_testclient_gets_a_clear_error(tmp_path: Path) -> None:
    """The app runs in TestClient's own event loop: refused, pointing to httpx.AsyncClient."""
    from starlette.testclient import TestClient

    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=f"sqlite+aiosqlite:///{tmp_path / 'client.sqlite3'}")

    @app.get("/")
    async def index() -> int:
        return int((await db.session.execute(text("SELECT 1"))).scalar_one())

    async def scenario() -> None:
        async with isolated():
            with TestClient(app) as client, pytest.raises(IsolationError) as raised:
                client.get("/")
            assert "httpx.AsyncClient(transport=httpx.ASGITransport(app=app))" in str(raised.value)

    asyncio.run(scenario())


PLUGIN_TESTS = """
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import create_middleware_and_session_proxy

pytestmark = pytest.mark.anyio
Middleware, db = create_middleware_and_session_proxy()
app = FastAPI()
app.add_middleware(Middleware, db_url=URL, commit_on_exit=True)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@app.post("/notes")
async def add() -> None:
    await db.session.execute(text("INSERT INTO notes VALUES ('written')"))


@app.get("/notes")
async def notes() -> list[str]:
    return list(await db.session.scalars(text("SELECT body FROM notes")))


@pytest.fixture
async def client():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_writes(db_isolation, client, assert_num_queries):
    with assert_num_queries(1):
        assert (await client.post("/notes")).status_code == 200
    assert (await client.get("/notes")).json() == ["written"]


async def test_sees_nothing_of_the_first(db_isolation, client):
    assert (await client.get("/notes")).json() == []
"""


def test_the_pytest_plugin_isolates_each_test(tmp_path: Path) -> None:
    """A test suite of a user's: two tests with `db_isolation`, in one pytest run."""
    import sqlite3
    import subprocess
    import sys

    database = tmp_path / "app.sqlite3"
    with closing(sqlite3.connect(database)) as connection:  # `with connect()` does not close
        connection.execute("CREATE TABLE notes (body TEXT)")
        connection.commit()
    url = f"sqlite+aiosqlite:///{database}"
    (tmp_path / "test_user_app.py").write_text(f"URL = {url!r}\n" + PLUGIN_TESTS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "-W",
            "ignore::DeprecationWarning",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT count(*) FROM notes").fetchone() == (0,)
