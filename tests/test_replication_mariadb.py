"""Read replicas on real MariaDB replication (GTIDs): read-your-writes and replication state.

``scripts/replicas.sh`` (run by ``make test``) makes a MariaDB primary with a binary log on
port 3307 and its replica on 3308. Lag is made with ``MASTER_DELAY`` or a stopped SQL thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import serve
from replicas import healthy, replicated_app, require, state_of
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.anyio

PRIMARY = os.environ.get("TEST_MARIADB_PRIMARY_URL", "mysql+asyncmy://root@127.0.0.1:3307/test")
REPLICA = os.environ.get("TEST_MARIADB_REPLICA_URL", "mysql+asyncmy://root@127.0.0.1:3308/test")
ROLE = text("SELECT IF(@@server_id = 1, 'primary', 'replica')")


async def run(url: str, *statements: str) -> Any:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                result = await connection.execute(text(statement))
        return result.scalar() if result.returns_rows else None
    finally:
        await engine.dispose()


async def replicated() -> None:
    """Wait (10 s at most) until the replica applied everything the primary logged."""
    position = await run(PRIMARY, "SELECT @@gtid_binlog_pos")
    waited = await run(REPLICA, f"SELECT MASTER_GTID_WAIT('{position}', 10)")
    assert waited == 0, f"the replica did not apply {position}"


async def replication(sql_thread: bool = True, delay: int = 0) -> None:
    await run(
        REPLICA,
        "STOP SLAVE",
        f"CHANGE MASTER TO MASTER_DELAY={delay}",
        "START SLAVE" if sql_thread else "START SLAVE IO_THREAD",
    )


@pytest.fixture
async def table() -> AsyncIterator[None]:
    """An empty ``items`` table on the primary, applied by the replica; replication running."""
    require(PRIMARY, REPLICA)
    await replication()
    await run(
        PRIMARY,
        "DROP TABLE IF EXISTS items",
        "CREATE TABLE items (id integer PRIMARY KEY, name varchar(50) UNIQUE)",
    )
    await replicated()
    yield
    await replication()
    await run(PRIMARY, "DROP TABLE IF EXISTS items")
    await replicated()


def app(**options: Any) -> tuple[Any, Any]:
    settings: dict[str, Any] = {"replica_reads": ["GET"], **options}
    return replicated_app(PRIMARY, [REPLICA], ROLE, **settings)  # type: ignore[no-any-return]


async def test_the_writer_reads_its_write_by_its_gtid_position(table: None) -> None:
    """A commit's token holds the primary's GTID position; while the replica applies it a
    second later (MASTER_DELAY), the writer reads from the primary, then from the replica."""
    the_app, db = app(replica_max_lag=60)
    async with serve(the_app) as client:
        await healthy(db)
        await replication(delay=2)
        wrote = await client.post("/items/mine")
        token = wrote.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        assert token.split(".")[0].count("-") == 2  # a GTID: domain-server-sequence
        assert (await client.get("/seen")).json() == {"names": ["mine"], "role": "primary"}
        transport = httpx.ASGITransport(app=the_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as stranger:
            assert (await stranger.get("/seen")).json() == {"names": [], "role": "replica"}
        for _ in range(200):
            seen = (await client.get("/seen")).json()
            if seen["role"] == "replica":
                break
            await asyncio.sleep(0.05)
        assert seen == {"names": ["mine"], "role": "replica"}


async def test_a_replica_whose_replication_stopped_is_skipped(table: None) -> None:
    """Seconds_Behind_Master unknown (the SQL thread stopped): nobody knows how stale the
    replica is, so the primary serves until replication runs again."""
    the_app, db = app(read_your_writes=None)
    async with serve(the_app) as client:
        await healthy(db)
        assert (await client.get("/role")).json() == "replica"
        await replication(sql_thread=False)
        await state_of(db, "lagging")
        assert db.replica_status()[0]["lag_seconds"] is None
        assert (await client.get("/role")).json() == "primary"
        await replication()
        await state_of(db, "healthy")
        assert db.replica_status()[0]["lag_seconds"] == 0.0
        assert (await client.get("/role")).json() == "replica"
