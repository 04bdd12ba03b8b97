"""Observability: `db.stats`, `Server-Timing`, the N+1 and slow-request warnings (SPEC §15)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import Database, items, make_app, new_item, serve, websocket_scope
from fastapi import FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy import ForeignKey, String, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncAttrs, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from fastapi_async_sqlalchemy import (
    DatabaseStats,
    DBSessionMeta,
    InvalidConfigurationError,
    MissingSessionError,
    NPlusOneError,
    SessionNotInitialisedError,
    create_middleware_and_session_proxy,
)
from fastapi_async_sqlalchemy._stats import shape

pytestmark = pytest.mark.anyio

HERE = __file__.rsplit("/", 1)[-1]
COUNT_ITEMS = select(func.count()).select_from(items)


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "obs_authors"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Book]] = relationship()


class Book(Base):
    __tablename__ = "obs_books"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    author_id: Mapped[int] = mapped_column(ForeignKey("obs_authors.id"))


@pytest.fixture
async def library(database: Database) -> AsyncIterator[Database]:
    """Twenty authors with a book each."""
    async with database.check.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(
            Author.__table__.insert(), [{"id": n, "name": f"a{n}"} for n in range(1, 21)]
        )
        await connection.execute(
            Book.__table__.insert(), [{"id": n, "author_id": n} for n in range(1, 21)]
        )
    yield database
    async with database.check.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)


def listeners(engine: Any) -> dict[str, int]:
    sync_engine = engine.sync_engine
    return {
        "do_execute": len(sync_engine.dialect.dispatch.do_execute),
        "checkout": len(sync_engine.pool.dispatch.checkout),
    }


# -- off by default ------------------------------------------------------------------------------


async def test_off_by_default_nothing_is_installed(database: Database) -> None:
    app, db = make_app(database)

    @app.get("/")
    async def index() -> None:
        await db.session.execute(COUNT_ITEMS)
        with pytest.raises(InvalidConfigurationError, match=r"pass stats=True"):
            db.stats  # noqa: B018

    async with serve(app) as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert "server-timing" not in response.headers
        assert listeners(db.engine) == {"do_execute": 0, "checkout": 0}


async def test_listeners_come_and_go_with_the_middleware(database: Database) -> None:
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(app=None, db_url=database.url, stats=True)  # type: ignore[arg-type]
    engine = db.engine
    assert listeners(engine) == {"do_execute": 1, "checkout": 1}
    await middleware.dispose()
    assert listeners(engine) == {"do_execute": 0, "checkout": 0}
    with pytest.raises(SessionNotInitialisedError):  # unbound, as db.session would say
        db.stats  # noqa: B018


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_plus_one": "sometimes"}, r'n_plus_one must be "warn".*"raise"'),
        ({"n_plus_one_threshold": 0}, r"n_plus_one_threshold must be a whole number"),
        ({"slow_request_threshold": -1}, r"slow_request_threshold must be a finite number"),
    ],
)
def test_bad_arguments_are_refused_up_front(arguments: dict[str, Any], message: str) -> None:
    Middleware, db = create_middleware_and_session_proxy()
    with pytest.raises(InvalidConfigurationError, match=message):
        Middleware(app=None, db_url="sqlite+aiosqlite://", **arguments)  # type: ignore[arg-type]
    assert db._binding is None


# -- db.stats ------------------------------------------------------------------------------------


async def test_a_requests_figures_include_its_children(database: Database) -> None:
    app, db = make_app(database, stats=True, commit_on_exit=True)
    seen: dict[str, Any] = {}

    async def read() -> None:
        await db.session.execute(COUNT_ITEMS)

    @app.post("/work")
    async def work() -> None:
        await db.session.execute(new_item("one"))
        async with db(multi_sessions=True):
            await db.gather(read(), read(), read())
        async with db(commit_on_exit=True):  # a block inside a request counts in the request
            await db.session.execute(COUNT_ITEMS)
        stats = db.stats
        seen.update(statements=stats.statements, time=stats.statement_time, commits=stats.commits)
        seen["stats"] = stats

    @app.get("/warm-up")
    async def warm_up() -> None:
        await db.session.execute(COUNT_ITEMS)

    async with serve(app) as client:
        # The first connection's dialect set-up (PostgreSQL: its version, schema, ...) runs
        # statements too, counted in the request that opened it.
        assert (await client.get("/warm-up")).status_code == 200
        assert (await client.post("/work")).status_code == 200
    assert seen["statements"] == 5
    assert seen["time"] > 0
    assert seen["commits"] == 1  # the inner block's (the request commits after the route)
    stats: DatabaseStats = seen["stats"]
    assert stats.commits == 2  # and the request's commit, later
    assert stats.commit_time > 0
    assert stats.pool_wait >= 0
    assert repr(stats).startswith("<DatabaseStats statements=5 ")


async def test_no_bleed_between_fifty_concurrent_requests(database: Database) -> None:
    app, db = make_app(database, stats=True)

    @app.get("/queries/{count}")
    async def queries(count: int) -> int:
        for _ in range(count):
            await db.session.execute(COUNT_ITEMS)
            await asyncio.sleep(0)  # let the other requests interleave
        return db.stats.statements

    async with serve(app) as client:
        await client.get("/queries/1")  # the first connection's dialect set-up counts there
        counts = [number % 7 + 1 for number in range(50)]
        responses = await asyncio.gather(*(client.get(f"/queries/{count}") for count in counts))
    assert [response.json() for response in responses] == counts


async def test_the_wait_for_a_pool_connection_is_measured(database: Database) -> None:
    app, db = make_app(database, stats=True, engine_args={"pool_size": 1, "max_overflow": 0})
    seen: dict[str, float] = {}

    @app.get("/")
    async def index() -> None:
        await db.session.execute(COUNT_ITEMS)  # waits for the pool's only connection
        await db.session.execute(COUNT_ITEMS)  # already connected: no wait
        seen["pool_wait"] = db.stats.pool_wait

    async with serve(app) as client:
        async with db.engine.connect() as holder:
            await holder.execute(COUNT_ITEMS)
            request = asyncio.create_task(client.get("/"))
            await asyncio.sleep(0.3)
        assert (await request).status_code == 200
    assert 0.25 <= seen["pool_wait"] < 5


async def test_a_block_outside_a_request_has_its_own_figures(database: Database) -> None:
    app, db = make_app(database, stats=True)
    async with serve(app):
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("one"))
            await db.session.execute(COUNT_ITEMS)
            assert db.stats.statements == 2
        async with db():
            assert db.stats.statements == 0
        with pytest.raises(MissingSessionError):
            db.stats  # noqa: B018


# -- Server-Timing -------------------------------------------------------------------------------


async def test_server_timing_on_responses_that_used_the_database(database: Database) -> None:
    app, db = make_app(database, server_timing=True, commit_on_exit=True)

    @app.post("/write")
    async def write() -> None:
        await db.session.execute(new_item("one"))
        await db.session.execute(COUNT_ITEMS)

    @app.get("/static")
    async def static() -> str:
        return "no database"

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        await db.session.execute(COUNT_ITEMS)

        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        return StreamingResponse(body())

    async with serve(app) as client:
        timing = (await client.post("/write")).headers["server-timing"]
        assert timing.startswith("db;dur=")
        assert 'desc="2 queries"' in timing
        assert "db-commit;dur=" in timing
        assert "server-timing" not in (await client.get("/static")).headers
        streamed = await client.get("/stream")
        assert streamed.text == "ab"
        assert 'desc="1 query"' in streamed.headers["server-timing"]


# -- N+1 and slow requests -----------------------------------------------------------------------


def lazy_loading_app(library: Database, **options: Any) -> tuple[FastAPI, DBSessionMeta]:
    """An app whose GET /authors lazy-loads each author's books: one SELECT per author."""
    app, db = make_app(library, **options)

    @app.get("/authors")
    async def authors() -> int:
        total = 0
        for author in await db.session.scalars(select(Author).order_by(Author.id)):
            total += len(await author.awaitable_attrs.books)  # one SELECT per author
        return total

    return app, db


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


async def test_an_n_plus_one_loop_is_one_warning(
    library: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = lazy_loading_app(library, n_plus_one_threshold=10)
    async with serve(app) as client:
        with caplog.at_level(logging.WARNING, logger="fastapi_async_sqlalchemy"):
            assert (await client.get("/authors")).json() == 20
    records = warnings_about(caplog, "N+1")
    assert len(records) == 1
    message = records[0].getMessage()
    assert "GET /authors" in message
    assert "FROM obs_books WHERE" in message
    assert f"{HERE}:" in message
    assert records[0].route == "GET /authors"  # type: ignore[attr-defined]


async def test_n_plus_one_raise_fails_the_request(library: Database) -> None:
    app, db = lazy_loading_app(library, n_plus_one_threshold=5, n_plus_one="raise")
    async with serve(app) as client:
        assert (await client.get("/authors")).status_code == 500
        # In a test that lets app errors through, the error itself:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as raising:
            with pytest.raises(NPlusOneError, match=r"GET /authors: one statement ran more th"):
                await raising.get("/authors")
        assert db.pool_status()["checked_out"] == 0


async def test_no_warning_below_the_threshold(
    library: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """One statement with different parameters, as often as the threshold allows."""
    app, db = make_app(library, n_plus_one_threshold=10)

    @app.get("/some")
    async def some() -> int:
        for number in range(1, 11):
            await db.session.get(Author, number)
        return db.stats.statements

    async with serve(app) as client:
        with caplog.at_level(logging.WARNING, logger="fastapi_async_sqlalchemy"):
            assert (await client.get("/some")).json() == 10
    assert not warnings_about(caplog, "N+1")


def test_statement_shapes_collapse_in_lists_and_placeholders() -> None:
    assert shape("SELECT * FROM t WHERE id IN (?, ?, ?)") == shape(
        "SELECT * FROM t WHERE id IN (?)"
    )
    assert shape("SELECT * FROM t WHERE id IN ($1, $2) AND x = $3") == shape(
        "SELECT * FROM t WHERE id IN ($1) AND x = $2"
    )
    assert shape("SELECT *  FROM t\n WHERE id IN (%s, %s)") == "SELECT * FROM t WHERE id IN (...)"
    assert shape("SELECT * FROM t WHERE a = ?") != shape("SELECT * FROM t WHERE b = ?")


async def test_a_slow_request_is_one_warning(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(database, slow_request_threshold=0.000001)
    pause = {"sqlite": "SELECT 1", "postgresql": "SELECT pg_sleep(0.05)"}.get(
        database.name, "SELECT SLEEP(0.05)"
    )

    @app.get("/slow")
    async def slow() -> None:
        await db.session.execute(COUNT_ITEMS)
        await db.session.execute(text(pause))  # the slowest on a server

    @app.get("/static")
    async def static() -> None:
        pass

    async with serve(app) as client:
        with caplog.at_level(logging.WARNING, logger="fastapi_async_sqlalchemy"):
            await client.get("/slow")
            await client.get("/static")
    records = warnings_about(caplog, "Slow database work")
    assert len(records) == 1
    message = records[0].getMessage()
    assert "GET /slow" in message
    assert "in 2 statements" in message
    assert f"{HERE}:" in message
    if database.name != "sqlite":
        assert pause.split("(")[0] in message


async def test_the_statement_hook_runs_the_dialects_own_method(database: Database) -> None:
    """The observer times the dialect's do_execute/do_executemany: the rows are written, and
    the cursor events of other listeners still fire."""
    app, db = make_app(database, stats=True, commit_on_exit=True)
    calls: list[str] = []
    async with serve(app):
        event.listen(db.engine.sync_engine, "after_cursor_execute", lambda *a: calls.append("x"))
        async with db(commit_on_exit=True):
            await db.session.execute(
                text("INSERT INTO items (id, name) VALUES (:id, :name)"),
                [{"id": 901, "name": "many-1"}, {"id": 902, "name": "many-2"}],
            )
            assert db.stats.statements == 1
        assert await database.names() == ["many-1", "many-2"]
    assert calls


# -- what the review found ------------------------------------------------------------------------


async def test_commits_are_the_commits_sent(database: Database) -> None:
    """A begin() block's COMMIT counts; a commit with nothing to commit does not."""
    app, db = make_app(database, stats=True, commit_on_exit=True)
    seen: dict[str, Any] = {}

    @app.post("/commits")
    async def commits() -> None:
        async with db.session.begin():
            await db.session.execute(new_item("in-begin"))
        await db.session.commit()  # nothing begun since: no COMMIT sent
        await db.session.execute(new_item("after"))
        await db.session.commit()
        await db.session.commit()  # again nothing to commit
        seen["commits"] = db.stats.commits
        seen["stats"] = db.stats

    async with serve(app) as client:
        assert (await client.post("/commits")).status_code == 200
    assert seen["commits"] == 2
    assert seen["stats"].commits == 2  # the middleware's commit at the end had nothing to send
    assert await database.names() == ["after", "in-begin"]


async def test_a_task_outliving_its_request_counts_on_its_own(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(database, n_plus_one_threshold=3)
    figures: list[int] = []
    done = asyncio.Event()

    async def poller() -> None:
        for _ in range(6):  # six blocks, the same statement in each: no N+1 of the request
            async with db():
                await db.session.execute(COUNT_ITEMS)
                figures.append(db.stats.statements)
        done.set()

    @app.post("/start")
    async def start() -> None:
        await db.session.execute(COUNT_ITEMS)
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(poller()))

    async with serve(app) as client:
        with caplog.at_level(logging.WARNING, logger="fastapi_async_sqlalchemy"):
            assert (await client.post("/start")).status_code == 200
            await asyncio.wait_for(done.wait(), 10)
    assert figures == [1] * 6
    assert not warnings_about(caplog, "N+1")


async def test_the_apps_own_statement_listeners_still_run(database: Database) -> None:
    app, db = make_app(database, stats=True)
    seen: list[str] = []

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        seen.append(statement)  # returns None: SQLAlchemy (or the next listener) runs it

    @app.get("/")
    async def index() -> int:
        await db.session.execute(text("SELECT 41 + 1"))
        return db.stats.statements

    async with serve(app) as client:
        event.listen(db.engine.sync_engine, "do_execute", do_execute)  # added after ours
        assert (await client.get("/")).json() == 1
    assert any("41 + 1" in statement for statement in seen)


async def test_a_left_over_observer_on_a_shared_engine_stays_out(database: Database) -> None:
    """Two apps on one custom_engine and one proxy; the first never disposed (no lifespan)."""
    engine = create_async_engine(database.url)
    Middleware, db = create_middleware_and_session_proxy()

    async def queries(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(5):
            await db.session.execute(COUNT_ITEMS)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(db.stats.statements).encode()})

    Middleware(queries, custom_engine=engine, n_plus_one_threshold=2, n_plus_one="raise")
    second = Middleware(queries, custom_engine=engine, stats=True)
    transport = httpx.ASGITransport(app=second)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).text == "5"  # the first one's "raise" does not apply
    await second.dispose()
    with pytest.raises(InvalidConfigurationError, match="before the middleware is disposed"):
        async with db():
            db.stats  # noqa: B018
    await engine.dispose()


async def test_websocket_connections_have_figures(database: Database) -> None:
    app, db = make_app(database, n_plus_one_threshold=3, n_plus_one="raise")
    seen: dict[str, Any] = {}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await db.session.execute(COUNT_ITEMS)
        seen["statements"] = db.stats.statements
        try:
            for _ in range(4):
                await db.session.execute(COUNT_ITEMS)
        except NPlusOneError as error:
            seen["error"] = error
        await websocket.close()

    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        pass

    async with serve(app):
        await app(websocket_scope("/ws"), receive, send)
    assert seen["statements"] == 1
    assert "ran more than 3 times" in str(seen["error"])
