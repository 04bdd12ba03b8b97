"""Engine ownership and the ASGI lifespan: what is disposed, when, and under which servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from conftest import Database, items, metadata, new_item, serve
from fastapi import FastAPI
from sqlalchemy import bindparam, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

import fastapi_async_sqlalchemy._engine
import fastapi_async_sqlalchemy._middleware
from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    MissingSessionError,
    ProxyBindingError,
    SessionNotInitialisedError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

Message = dict[str, Any]

LOGGER = "fastapi_async_sqlalchemy.middleware"
STARTUP_FAILED = "lifespan.startup.failed"
SHUTDOWN_COMPLETE = "lifespan.shutdown.complete"
SHUTDOWN_FAILED = "lifespan.shutdown.failed"
LIFESPAN_ENDS = [SHUTDOWN_COMPLETE, SHUTDOWN_FAILED, STARTUP_FAILED]

# How a connection tells its server-side id, by dialect name (SQLite connections have none).
SERVER_ID_QUERIES = {
    "postgresql": "SELECT pg_backend_pid()",
    "mysql": "SELECT CONNECTION_ID()",
    "mariadb": "SELECT CONNECTION_ID()",
}


class Connections:
    """The connections that watched engines open and close, and which the server still holds.

    Each connection is known by its server-side id (the PostgreSQL backend pid or the MariaDB
    connection id, looked up in our own database only), so other people's connections to the
    same servers never count.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engines: list[AsyncEngine] = []
        self.opened: list[int | None] = []
        self.closed = 0

    def watch(self, engine: AsyncEngine) -> AsyncEngine:
        query = SERVER_ID_QUERIES.get(engine.dialect.name)

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            server_id = None
            if query is not None:
                cursor = dbapi_connection.cursor()
                cursor.execute(query)
                server_id = cursor.fetchone()[0]
                cursor.close()
            self.opened.append(server_id)

        def on_close(dbapi_connection: Any, record: Any) -> None:
            self.closed += 1

        event.listen(engine.sync_engine, "connect", on_connect)
        event.listen(engine.sync_engine, "close", on_close)
        self.engines.append(engine)
        return engine

    @property
    def pooled(self) -> int:
        """Connections opened and not closed yet, checked in or out."""
        return len(self.opened) - self.closed

    @property
    def server_ids(self) -> list[int]:
        return [server_id for server_id in self.opened if server_id is not None]

    async def on_server(self) -> list[int]:
        """The ids of the watched connections the server has right now."""
        ids = self.server_ids
        if not ids:
            return []
        if make_url(self.url).get_backend_name() == "postgresql":
            query = text(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid = ANY(:ids)"
            )
        else:
            query = text(
                "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
        check = create_async_engine(self.url, poolclass=NullPool)
        try:
            async with check.connect() as connection:
                return sorted((await connection.execute(query, {"ids": ids})).scalars())
        finally:
            await check.dispose()

    async def left_on_server(self) -> list[int]:
        """The watched connections still on the server once it had up to 5s to see them close."""
        remaining = await self.on_server()
        for _ in range(100):  # a closed client socket ends its server session a moment later
            if not remaining:
                break
            await asyncio.sleep(0.05)
            remaining = await self.on_server()
        return remaining


@pytest.fixture
def connections(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Connections:
    """Watches every engine that a middleware creates from a db_url during the test."""
    watched = Connections(database_url)

    def create_and_watch(*args: Any, **kwargs: Any) -> AsyncEngine:
        return watched.watch(create_async_engine(*args, **kwargs))

    middleware_module = fastapi_async_sqlalchemy._engine
    monkeypatch.setattr(middleware_module, "create_async_engine", create_and_watch)
    return watched


def proxy_state(db: DBSessionMeta) -> str:
    """'unbound' when no middleware holds the proxy, 'bound' when one does (outside any scope)."""
    try:
        db.session  # noqa: B018
    except SessionNotInitialisedError:
        return "unbound"
    except MissingSessionError:
        return "bound"
    return "in a scope"


def app_ending_with(db: DBSessionMeta, ending: str) -> FastAPI:
    """An app whose lifespan uses the database at startup and then ends with ``ending``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with db():
            await db.session.execute(text("SELECT 1"))
        if ending == STARTUP_FAILED:
            raise RuntimeError("startup failed")
        yield
        if ending == SHUTDOWN_FAILED:
            raise RuntimeError("shutdown failed")

    return FastAPI(lifespan=lifespan)


async def run_lifespan(
    app: Any, on_message: Callable[[Message], Awaitable[None]] | None = None
) -> tuple[list[str], Exception | None]:
    """Play the server's side of one lifespan cycle by hand.

    ``on_message`` sees every message the app sends, before the server takes note of it. Gives
    back the types of the messages the server got, in order, and what the app raised.
    """
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    received: list[str] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        if on_message is not None:
            await on_message(message)
        received.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    try:
        await app(scope, receive, send)
    except Exception as exc:
        return received, exc
    return received, None


def expected_messages(ending: str) -> list[str]:
    return [ending] if ending == STARTUP_FAILED else ["lifespan.startup.complete", ending]


# -- owned engines are disposed when the lifespan ends ----------------------------------------


@pytest.mark.parametrize("ending", LIFESPAN_ENDS)
async def test_owned_engine_is_disposed_before_the_server_hears_the_lifespan_end(
    database: Database, connections: Connections, ending: str
) -> None:
    """When the server receives the end message, the proxy is unbound and no connection is left."""
    Middleware, db = create_middleware_and_session_proxy()
    app = app_ending_with(db, ending)
    app.add_middleware(Middleware, db_url=database.url)
    at_end: dict[str, Any] = {}

    async def server(message: Message) -> None:
        if message["type"] in LIFESPAN_ENDS:
            at_end["proxy"] = proxy_state(db)
            at_end["pooled"] = connections.pooled
            at_end["on server"] = await connections.left_on_server()

    received, raised = await run_lifespan(app, server)

    assert received == expected_messages(ending)
    if ending == SHUTDOWN_COMPLETE:
        assert raised is None
    else:  # the handler's own error reaches the server
        assert isinstance(raised, RuntimeError)
        assert str(raised) == ("startup failed" if ending == STARTUP_FAILED else "shutdown failed")
    assert len(connections.opened) == 1  # the startup code really held a connection
    assert at_end == {"proxy": "unbound", "pooled": 0, "on server": []}
    with pytest.raises(SessionNotInitialisedError):
        db.session  # noqa: B018


@pytest.mark.parametrize("ending", LIFESPAN_ENDS)
async def test_lifespan_end_reaches_the_server_even_when_disposal_fails(
    database: Database,
    connections: Connections,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
) -> None:
    """A failing dispose is logged with its traceback and the end message still goes out."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(app_ending_with(db, ending), db_url=database.url)
    failure = RuntimeError("dispose failed")

    def failing_dispose(*args: Any, **kwargs: Any) -> None:
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(middleware.engine.sync_engine, "dispose", failing_dispose)
        received, _ = await run_lifespan(middleware)

    assert received == expected_messages(ending)
    logged = [record for record in caplog.records if record.name == LOGGER]
    assert [(record.levelno, record.exc_info and record.exc_info[1]) for record in logged] == [
        (logging.ERROR, failure)
    ]
    assert proxy_state(db) == "unbound"
    assert connections.pooled == 1

    await middleware.dispose()  # the engine was left as it was, so a retry really disposes it
    assert connections.pooled == 0
    assert await connections.left_on_server() == []


@pytest.mark.parametrize("ending", LIFESPAN_ENDS)
async def test_custom_engine_survives_every_lifespan_end_with_its_connections(
    database: Database, ending: str
) -> None:
    """The caller's engine keeps its pooled connection and keeps working after the lifespan."""
    connections = Connections(database.url)
    engine = connections.watch(create_async_engine(database.url))
    try:
        Middleware, db = create_middleware_and_session_proxy()
        app = app_ending_with(db, ending)
        app.add_middleware(Middleware, custom_engine=engine)

        received, _ = await run_lifespan(app)

        assert received == expected_messages(ending)
        assert proxy_state(db) == "bound"  # as in 0.8: `async with db():` still works after it
        assert (connections.pooled, engine.pool.checkedin()) == (1, 1)
        assert await connections.on_server() == connections.server_ids
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
        assert len(connections.opened) == 1  # the same pooled connection served again
    finally:
        await engine.dispose()
    assert connections.pooled == 0


async def test_second_lifespan_cycle_binds_the_proxy_again(
    database: Database, connections: Connections
) -> None:
    """The same app started a second time serves requests again, and is disposed again."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=database.url, commit_on_exit=True)

    @app.post("/items/{name}")
    async def add(name: str) -> dict[str, str]:
        await db.session.execute(new_item(name))
        return {"added": name}

    after_each_cycle = []
    for cycle in ["first", "second"]:
        async with serve(app) as client:
            response = await client.post(f"/items/{cycle}")
            assert proxy_state(db) == "bound"
        after_each_cycle.append((response.status_code, proxy_state(db), connections.pooled))

    assert after_each_cycle == [(200, "unbound", 0), (200, "unbound", 0)]
    assert len(connections.engines) == 1
    assert await database.names() == ["first", "second"]
    assert await connections.left_on_server() == []


# -- the ways apps are run: test clients and a real server ------------------------------------


def items_app(db: DBSessionMeta) -> FastAPI:
    """An app that adds items and lists them, all through the request session."""
    app = FastAPI()

    @app.post("/items/{name}")
    async def add(name: str) -> dict[str, str]:
        await db.session.execute(new_item(name))
        return {"added": name}

    @app.get("/items")
    async def names() -> list[str]:
        result = await db.session.execute(select(items.c.name).order_by(items.c.name))
        return list(result.scalars())

    return app


@pytest.fixture
def items_table(database_url: str) -> Iterator[str]:
    """``database_url`` with an empty ``items`` table, for tests that run their own event loops."""

    async def recreate(create: bool) -> None:
        engine = create_async_engine(database_url, poolclass=NullPool)
        async with engine.begin() as connection:
            await connection.run_sync(metadata.drop_all)
            if create:
                await connection.run_sync(metadata.create_all)
        await engine.dispose()

    asyncio.run(recreate(create=True))
    yield database_url
    asyncio.run(recreate(create=False))


def test_test_client_with_block_runs_the_lifespan_and_disposes_the_engine(
    items_table: str, connections: Connections
) -> None:
    """Inside `with TestClient(app)` requests work; leaving the block disposes the engine."""
    Middleware, db = create_middleware_and_session_proxy()
    app = items_app(db)
    app.add_middleware(Middleware, db_url=items_table, commit_on_exit=True)

    with TestClient(app) as client:  # one event loop, in a thread, for the whole block
        added = client.post("/items/one")
        listed = client.get("/items")
        assert proxy_state(db) == "bound"

    assert (added.status_code, listed.json()) == (200, ["one"])
    assert proxy_state(db) == "unbound"
    assert connections.opened
    assert connections.pooled == 0
    assert asyncio.run(connections.left_on_server()) == []


# Each call without `with` runs in an event loop of its own, and server drivers cannot carry a
# pooled connection from one loop to the next: only SQLite's driver can.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_test_client_without_with_block_leaves_the_engine_to_the_caller(
    items_table: str, connections: Connections
) -> None:
    """Without `with`, requests work but no lifespan runs: the proxy stays bound until dispose()."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(items_app(db), db_url=items_table, commit_on_exit=True)

    client = TestClient(middleware)
    added = client.post("/items/one")
    listed = client.get("/items")
    client.close()

    assert (added.status_code, listed.json()) == (200, ["one"])
    assert proxy_state(db) == "bound"
    assert db.engine is middleware.engine
    assert connections.pooled == 1  # nobody disposed the engine

    asyncio.run(middleware.dispose())
    assert proxy_state(db) == "unbound"
    assert connections.pooled == 0


async def test_lifespan_manager_with_asgi_transport_serves_and_then_disposes(
    database: Database, connections: Connections
) -> None:
    """httpx's ASGITransport inside asgi-lifespan's LifespanManager serves; leaving disposes."""
    Middleware, db = create_middleware_and_session_proxy()
    app = items_app(db)
    app.add_middleware(Middleware, db_url=database.url, commit_on_exit=True)

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            added = [(await client.post(f"/items/{name}")).status_code for name in ["a", "b"]]
            listed = (await client.get("/items")).json()
        assert db.engine is connections.engines[0]

    assert (added, listed) == ([200, 200], ["a", "b"])
    assert (proxy_state(db), connections.pooled) == ("unbound", 0)
    assert await connections.left_on_server() == []


async def started(server: uvicorn.Server, serving: asyncio.Task[None]) -> int:
    """Wait, at most 10s, until ``server`` accepts connections; its port."""
    async with asyncio.timeout(10):
        while not server.started:
            if serving.done():
                serving.result()
                pytest.fail("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port


async def test_uvicorn_serves_requests_and_leaves_no_connection_behind(
    database: Database, connections: Connections
) -> None:
    """Requests through a real uvicorn server work; once it stops, no connection of ours is left."""
    Middleware, db = create_middleware_and_session_proxy()
    app = items_app(db)
    app.add_middleware(Middleware, db_url=database.url, commit_on_exit=True)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        port = await started(server, serving)
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
            added = [(await client.post(f"/items/{name}")).status_code for name in ["a", "b", "c"]]
            listed = (await client.get("/items")).json()
        assert connections.pooled >= 1  # kept in the pool while the server runs
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await serving

    assert (added, listed) == ([200, 200, 200], ["a", "b", "c"])
    assert (proxy_state(db), connections.pooled) == ("unbound", 0)
    assert await connections.left_on_server() == []


# -- one proxy, one live engine ---------------------------------------------------------------


async def test_second_middleware_is_refused_until_the_first_lifespan_ends(
    database: Database, connections: Connections
) -> None:
    """While the first app runs, a second engine is refused; once it ended, a new one binds."""
    Middleware, db = create_middleware_and_session_proxy()
    first = items_app(db)
    first.add_middleware(Middleware, db_url=database.url)

    async with serve(first):
        with pytest.raises(ProxyBindingError) as refused:
            Middleware(items_app(db), db_url=database.url)
        assert proxy_state(db) == "bound"
    assert len(connections.engines) == 1  # the refused middleware created no engine

    second = Middleware(items_app(db), db_url=database.url, commit_on_exit=True)
    try:
        assert db.engine is second.engine is connections.engines[1]
        async with serve(second) as client:
            added = await client.post("/items/second")
    finally:
        await second.dispose()

    assert isinstance(refused.value, RuntimeError)
    assert "create_middleware_and_session_proxy()" in str(refused.value)
    assert added.status_code == 200
    assert await database.names() == ["second"]


async def test_app_restarting_while_another_engine_holds_its_proxy_fails_its_startup(
    database: Database,
) -> None:
    """A later lifespan of an app whose proxy another engine took reports startup.failed, then
    raises (as Starlette's lifespan does), so servers and test clients stop instead of waiting."""
    Middleware, db = create_middleware_and_session_proxy()
    first = Middleware(items_app(db), db_url=database.url)
    await first.dispose()
    second = Middleware(items_app(db), db_url=database.url)
    failures: list[str] = []

    async def on_message(message: Message) -> None:
        if message["type"] == STARTUP_FAILED:
            failures.append(message["message"])

    try:
        received, raised = await run_lifespan(first, on_message)
        assert db.engine is second.engine
    finally:
        await second.dispose()

    assert received == [STARTUP_FAILED]
    assert isinstance(raised, ProxyBindingError)
    assert "create_middleware_and_session_proxy()" in failures[0]


async def test_dispose_retries_after_a_failure_and_does_nothing_after_success(
    database: Database, connections: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed dispose() unbinds the proxy and the next call really disposes; later ones no-op."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(FastAPI(), db_url=database.url)
    assert db.engine is middleware.engine
    async with db():
        await db.session.execute(text("SELECT 1"))

    engine = middleware.engine.sync_engine
    real_dispose = engine.dispose
    calls: list[str] = []

    def dispose_failing_once(*args: Any, **kwargs: Any) -> None:
        calls.append("dispose")
        if len(calls) == 1:
            raise RuntimeError("dispose failed")
        real_dispose(*args, **kwargs)

    monkeypatch.setattr(engine, "dispose", dispose_failing_once)

    with pytest.raises(RuntimeError, match="dispose failed"):
        await middleware.dispose()
    after_failure = (proxy_state(db), connections.pooled)
    await middleware.dispose()
    after_retry = (proxy_state(db), connections.pooled, len(calls))
    await middleware.dispose()
    await middleware.dispose()

    assert after_failure == ("unbound", 1)
    assert after_retry == ("unbound", 0, 2)
    assert len(calls) == 2
    assert await connections.left_on_server() == []
