"""A primary with two read replicas, on each of the three databases, for the routing tests.

- PostgreSQL: the real thing, made by ``scripts/replicas.sh``: a primary on port 5433 and two
  streaming replicas on 5434 and 5435. Rows written on the primary reach them by replication.
- SQLite and MariaDB have no replica here: each "replica" is a database of its own (a file, a
  schema) with the same tables, and :meth:`Pair.seed` writes a row to all of them.

Every server answers :attr:`Pair.role` (``"primary"``, ``"replica-a"``, ``"replica-b"``), which
tells a test where a statement ran.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_URLS, Row, _next_id, _server_reachable, items, metadata
from fastapi import FastAPI
from sqlalchemy import Column, MetaData, String, Table, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from fastapi_async_sqlalchemy import create_middleware_and_session_proxy

PRIMARY_URL = os.environ.get(
    "TEST_PRIMARY_URL", "postgresql+asyncpg://postgres@127.0.0.1:5433/test"
)
REPLICA_URLS = os.environ.get(
    "TEST_REPLICA_URLS",
    "postgresql+asyncpg://postgres@127.0.0.1:5434/test,"
    "postgresql+asyncpg://postgres@127.0.0.1:5435/test",
).split(",")
BOUNCER_URL = os.environ.get(
    "TEST_PGBOUNCER_URL", "postgresql+asyncpg://postgres@127.0.0.1:6432/test"
)

# Tables of the fake replicas only: which server this is.
roles = MetaData()
whoami = Table("whoami", roles, Column("role", String(20)))

_PG_ROLE = (
    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 'primary' "
    f"WHEN inet_server_port() = {make_url(REPLICA_URLS[0]).port} THEN 'replica-a' "
    "ELSE 'replica-b' END"
)


def require(*urls: str) -> None:
    """Skip (or, in CI, fail) unless every server of ``urls`` answers."""
    for url in urls:
        if not _server_reachable(url):
            message = (
                f"{make_url(url).render_as_string()} is not reachable: run scripts/replicas.sh "
                "(make test does)"
            )
            if os.environ.get("CI"):
                pytest.fail(f"{message}; CI must test the replicas")
            pytest.skip(message)


@dataclass
class Pair:
    """A primary and two replicas of one database kind, each with an empty ``items`` table."""

    name: str
    primary: str
    replicas: list[str]
    engines: dict[str, AsyncEngine] = field(default_factory=dict)  # NullPool, by role

    @property
    def role(self) -> Any:
        """A statement answering where it ran."""
        return text(_PG_ROLE if self.name == "postgresql" else "SELECT role FROM whoami")

    async def seed(self, *names: str) -> None:
        """Commit rows on the primary; they are on every replica when this returns."""
        for role, engine in self.engines.items():
            if role != "primary" and self.name == "postgresql":
                continue  # replication brings them
            async with engine.begin() as connection:
                for name in names:
                    await connection.execute(items.insert().values(id=_next_id(), name=name))
        await self.replayed()

    async def replayed(self) -> None:
        """Wait until the replicas replayed everything the primary committed (PostgreSQL)."""
        if self.name == "postgresql":
            await caught_up(self.replicas)

    async def names(self, role: str = "primary") -> list[str]:
        async with self.engines[role].connect() as connection:
            result = await connection.execute(text("SELECT name FROM items ORDER BY name"))
            return [row[0] for row in result]


async def caught_up(urls: list[str]) -> None:
    """Wait (10 s at most) until the replicas of ``urls`` replayed what the primary has."""
    primary = create_async_engine(PRIMARY_URL, poolclass=NullPool)
    async with primary.connect() as connection:
        position = await connection.scalar(text("SELECT pg_current_wal_lsn()::text"))
    await primary.dispose()
    for url in urls:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.connect() as connection:
            for _ in range(1000):
                reached = text("SELECT pg_last_wal_replay_lsn() >= CAST(:p AS pg_lsn)")
                if await connection.scalar(reached.bindparams(p=position)):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"{url} did not catch up")
        await engine.dispose()


async def healthy(proxy: Any, count: int | None = None) -> None:
    """Wait (10 s at most) until the proxy's replicas (or the first ``count``) are healthy."""
    for _ in range(500):
        states = [status["state"] for status in proxy.replica_status()]
        if all(state == "healthy" for state in states[:count]):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the replicas did not become healthy: {proxy.replica_status()}")


async def state_of(proxy: Any, wanted: str, index: int = 0) -> None:
    """Wait (10 s at most) until replica ``index`` of the proxy is in state ``wanted``."""
    for _ in range(500):
        if proxy.replica_status()[index]["state"] == wanted:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"replica {index} never became {wanted}: {proxy.replica_status()}")


def replicated_app(primary: str, replicas: list[str], role: Any, **options: Any) -> Any:
    """``(app, db)``: a FastAPI app whose middleware has these replicas, checked every 50 ms.

    Routes: ``/role`` (GET and POST: where the statement ran, by ``role``), ``/names`` (the
    names in ``items``), ``/seen`` (both), and ``POST /items/{name}`` (adds a row, commits).
    """
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    settings = {"replica_check_interval": 0.05, **options}
    app.add_middleware(Middleware, db_url=primary, replica_urls=replicas, **settings)

    @app.api_route("/role", methods=["GET", "POST"])
    async def where() -> str:
        return str(await db.session.scalar(role))

    @app.get("/names")
    async def names() -> list[str]:
        return list(await db.session.scalars(select(items.c.name).order_by(items.c.name)))

    @app.get("/seen")
    async def seen() -> dict[str, Any]:
        return {"names": await names(), "role": await where()}

    @app.post("/items/{name}")
    async def add(name: str) -> str:
        db.session.add(Row(id=_next_id(), name=name))
        await db.session.commit()
        return name

    return app, db


@pytest.fixture(name="pair")
async def pair_fixture(database_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    """``pair``: a primary and two replicas on the database of ``database_url``."""
    kind = make_url(database_url).get_backend_name()
    name = "mariadb" if kind == "mysql" else kind
    if name == "postgresql":
        require(PRIMARY_URL, *REPLICA_URLS)
        found = Pair(name, PRIMARY_URL, list(REPLICA_URLS))
    elif name == "sqlite":
        found = Pair(
            name,
            database_url,
            [f"sqlite+aiosqlite:///{tmp_path / f'replica-{x}.sqlite3'}" for x in "ab"],
        )
    else:
        base = make_url(SERVER_URLS["mariadb"])
        schemas = [f"{base.database}_replica_{x}" for x in "ab"]
        admin = create_async_engine(base, poolclass=NullPool)
        async with admin.begin() as connection:
            for schema in schemas:
                await connection.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{schema}`")
        await admin.dispose()
        replicas = [base.set(database=schema).render_as_string(False) for schema in schemas]
        found = Pair(name, database_url, replicas)
    urls = {"primary": found.primary, "replica-a": found.replicas[0]}
    urls["replica-b"] = found.replicas[1]
    for role, url in urls.items():
        found.engines[role] = create_async_engine(url, poolclass=NullPool)
    for role, engine in found.engines.items():
        if name == "postgresql" and role != "primary":
            continue
        async with engine.begin() as connection:
            await connection.run_sync(metadata.drop_all)
            await connection.run_sync(metadata.create_all)
            if name != "postgresql":
                await connection.run_sync(roles.drop_all)
                await connection.run_sync(roles.create_all)
                await connection.execute(whoami.insert().values(role=role))
    await found.replayed()
    yield found
    for role, engine in found.engines.items():
        if name != "postgresql" or role == "primary":
            async with engine.begin() as connection:
                await connection.run_sync(metadata.drop_all)
                await connection.run_sync(roles.drop_all)
        await engine.dispose()
