"""Shared fixtures: the three databases, a fresh table, and an app driven in-process.

Every behaviour test takes the ``database`` fixture and so runs on SQLite (aiosqlite), PostgreSQL
(asyncpg) and MariaDB (asyncmy). Server URLs come from ``TEST_POSTGRES_URL`` and
``TEST_MARIADB_URL``; ``TEST_DATABASES=sqlite`` (a comma-separated list) narrows the run. A
server that cannot be reached skips its tests on a developer's machine and fails them in CI
(``CI`` set), so a green CI always means all three databases were tested.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import registry
from sqlalchemy.pool import NullPool

from fastapi_async_sqlalchemy import DBSessionMeta, create_middleware_and_session_proxy

T = TypeVar("T")

SERVER_URLS = {
    "postgresql": os.environ.get(
        "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get("TEST_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306/test"),
}

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(50), unique=True),
)


class Row:
    """``items`` mapped for the ORM: a row added with ``session.add()`` is flushed at commit."""

    def __init__(self, id: int, name: str) -> None:
        self.id = id
        self.name = name


registry().map_imperatively(Row, items)


@dataclass
class Database:
    """One of the three test databases, with a freshly created ``items`` table."""

    name: str
    url: str
    check: AsyncEngine  # a NullPool engine for looking at what was really committed

    async def names(self) -> list[str]:
        """The names of the committed rows of ``items``, sorted."""
        async with self.check.connect() as connection:
            result = await connection.execute(select(items.c.name).order_by(items.c.name))
            return [row[0] for row in result]

    async def count(self) -> int:
        async with self.check.connect() as connection:
            return (await connection.execute(select(func.count()).select_from(items))).scalar_one()

    async def insert(self, *names: str) -> None:
        async with self.check.begin() as connection:
            for name in names:
                await connection.execute(items.insert().values(id=_next_id(), name=name))


_ids = iter(range(1, 10**9))


def _next_id() -> int:
    return next(_ids)


def new_item(name: str) -> Any:
    """An INSERT of one row named ``name`` (ids are unique across the test run)."""
    return items.insert().values(id=_next_id(), name=name)


_reachable: dict[str, bool] = {}


def _server_reachable(url: str) -> bool:
    parsed = make_url(url)
    key = f"{parsed.host}:{parsed.port}"
    if key not in _reachable:
        try:
            with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 0), 2):
                _reachable[key] = True
        except OSError:
            _reachable[key] = False
    return _reachable[key]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


DATABASES = [
    name.strip()
    for name in os.environ.get("TEST_DATABASES", "sqlite,postgresql,mariadb").split(",")
    if name.strip()
]


def only_on(*names: str) -> pytest.MarkDecorator:
    """Run a test on these of the three databases only (a behaviour specific to them), among
    those that ``TEST_DATABASES`` selects."""
    chosen: list[Any] = [name for name in names if name in DATABASES]
    if not chosen:
        reason = f"{'/'.join(names)} not selected by TEST_DATABASES"
        chosen = [pytest.param(names[0], marks=pytest.mark.skip(reason=reason))]
    return pytest.mark.parametrize("database_url", chosen, indirect=True)


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    name: str = request.param
    if name == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
    url = SERVER_URLS[name]
    if not _server_reachable(url):
        message = f"{name} is not reachable at {make_url(url).render_as_string()}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must test every database")
        pytest.skip(message)
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A database with an empty ``items`` table; dropped again after the test."""
    check = create_async_engine(database_url, poolclass=NullPool)
    async with check.begin() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)
    name = make_url(database_url).get_backend_name()
    yield Database("mariadb" if name == "mysql" else name, database_url, check)
    async with check.begin() as connection:
        await connection.run_sync(metadata.drop_all)
    await check.dispose()


async def unused_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app for middlewares that only bind a proxy and are never called."""
    raise AssertionError("the ASGI app is not called in these tests")


@asynccontextmanager
async def bound(url: str, **engine_args: Any) -> AsyncIterator[DBSessionMeta]:
    """A fresh proxy bound by a middleware built outside any app, disposed at the end."""
    Middleware, proxy = create_middleware_and_session_proxy()
    middleware = Middleware(app=unused_app, db_url=url, engine_args=engine_args)
    try:
        yield proxy
    finally:
        await middleware.dispose()


async def while_the_pool_is_held(engine: AsyncEngine, work: Awaitable[T]) -> T:
    """Run ``work`` while a connection of ``engine``'s pool (its only one) is held elsewhere.

    ``work`` must end by itself within 10 s; not by ``asyncio.timeout()``, which a cleanup that
    ignores deadlines would ignore too. Once the holder lets go, a stuck ``work`` can finish, so
    a failure here does not hang the test run.
    """
    async with engine.connect() as holder:
        await holder.execute(select(1))
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, "the work waited for a connection past the pool's deadline"
    return task.result()


def make_app(database: Database, **options: Any) -> tuple[FastAPI, DBSessionMeta]:
    """A FastAPI app with a fresh middleware/proxy pair on ``database``."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=database.url, **options)
    return app, db


def http_scope(method: str, path: str) -> dict[str, Any]:
    """The scope a server gives an HTTP/1.1 request (spec 2.0: Starlette watches disconnects)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "extensions": {"http.response.pathsend": {}},
    }


def websocket_scope(path: str) -> dict[str, Any]:
    """The scope a server gives a websocket handshake for ``path``."""
    scope = http_scope("GET", path)
    del scope["method"], scope["extensions"]
    scope.update(type="websocket", scheme="ws", subprotocols=[])
    return scope


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and give a client that calls it in-process.

    Server errors come back as 500 responses, as a real server would send them.
    """
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
def client_for() -> Callable[[Any], Any]:
    """``async with client_for(app) as client:`` (see :func:`serve`)."""
    return serve
