"""Read replicas on real PostgreSQL streaming replication, and PgBouncer (SPEC §16).

The servers come from ``scripts/replicas.sh`` (``make test`` runs it): a primary on 5433, its
replicas on 5434 and 5435, PgBouncer on 6432 in front of the suite's PostgreSQL. Lag on
loopback is far below a millisecond, so the tests that need lag make it by pausing replay.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import items, serve, unused_app
from fastapi import FastAPI
from replicas import (
    BOUNCER_URL,
    PRIMARY_URL,
    REPLICA_URLS,
    caught_up,
    healthy,
    replicated_app,
    require,
    state_of,
)
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from fastapi_async_sqlalchemy import create_middleware_and_session_proxy, pgbouncer_engine_args

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).parent.parent / "scripts" / "replicas.sh"
ROLE = text("SELECT CASE WHEN NOT pg_is_in_recovery() THEN 'primary' ELSE 'replica' END")


def script(*args: str) -> None:
    subprocess.run([str(SCRIPT), *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
async def table() -> AsyncIterator[None]:
    """An empty ``items`` table on the primary, replayed by the replicas; replay running."""
    require(PRIMARY_URL, *REPLICA_URLS)
    primary = create_async_engine(PRIMARY_URL, poolclass=NullPool)
    async with primary.begin() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS items"))
        await connection.execute(
            text("CREATE TABLE items (id integer PRIMARY KEY, name varchar(50) UNIQUE)")
        )
    await replay(True)
    yield
    await replay(True)
    async with primary.begin() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS items"))
    await primary.dispose()


async def replay(on: bool, urls: list[str] = REPLICA_URLS) -> None:
    """Pause or resume WAL replay on the replicas (resuming waits until they caught up)."""
    for url in urls:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.connect() as connection:
            call = "pg_wal_replay_resume" if on else "pg_wal_replay_pause"
            await connection.execute(text(f"SELECT {call}()"))
        await engine.dispose()
    if on:
        await caught_up(urls)


def app_with(replicas: list[str], **options: Any) -> tuple[FastAPI, Any]:
    """An app on the primary and ``replicas``, GET requests read from a replica."""
    settings: dict[str, Any] = {"replica_reads": ["GET"], **options}
    return replicated_app(PRIMARY_URL, replicas, ROLE, **settings)  # type: ignore[no-any-return]


# -- read-your-writes -------------------------------------------------------------------------


async def test_the_writer_reads_its_write_while_replay_is_paused(table: None) -> None:
    app, db = app_with(REPLICA_URLS, replica_max_lag=60)
    async with serve(app) as client:
        await healthy(db)
        await replay(False)
        wrote = await client.post("/items/mine")
        assert wrote.status_code == 200
        assert "set-cookie" in wrote.headers
        started = time.monotonic()
        mine = (await client.get("/seen")).json()
        waited = time.monotonic() - started
        # The replicas lack the row: the token's holder is served by the primary, after the
        # bounded wait for a replica to catch up (replica_wait, 10 ms).
        assert mine == {"names": ["mine"], "role": "primary"}
        assert waited < 1.0
        # Everyone else reads the replicas, which do not have it yet.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as stranger:
            assert (await stranger.get("/seen")).json() == {"names": [], "role": "replica"}
        await replay(True)
        # Replayed: the token's holder reads from a replica again, and sees the row there.
        for _ in range(100):
            mine = (await client.get("/seen")).json()
            if mine["role"] == "replica":
                break
            await asyncio.sleep(0.02)
        assert mine == {"names": ["mine"], "role": "replica"}


async def test_a_token_costs_no_round_trip_once_the_replica_is_known_to_be_past_it(
    table: None,
) -> None:
    """Without a token a request sends only its own statements; with one whose position the
    last check already saw replayed, too. Only the writer pays: one read of the position."""
    app, db = app_with(REPLICA_URLS[:1], replica_check_interval=0.2)
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pg_is_in_recovery() THEN pg_last" not in statement and "wal_lsn()" not in statement:
            sent.append(statement)

    async with serve(app) as client:
        await healthy(db)
        router = db._binding.router
        engines = [router.replicas.primary.sync_engine]
        engines += [replica.engine.sync_engine for replica in router.replicas.replicas]
        for engine in engines:
            event.listen(engine, "before_cursor_execute", count)
        await client.get("/role")
        assert len(sent) == 1, sent
        sent.clear()
        await client.post("/items/a")
        assert any("pg_current_wal_insert_lsn" in s for s in sent), sent
        # The INSERT and the position (BEGIN and COMMIT are no cursor statements).
        assert len(sent) == 2, sent
        await caught_up(REPLICA_URLS[:1])
        await asyncio.sleep(0.5)  # a check saw the replica past the write
        sent.clear()
        assert (await client.get("/role")).json() == "replica"
        assert len(sent) == 1, sent
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)


# -- health and lag ---------------------------------------------------------------------------


async def test_a_lagging_replica_is_skipped_until_it_catches_up(table: None) -> None:
    app, db = app_with(REPLICA_URLS[:1], replica_max_lag=0.3, read_your_writes=None)
    async with serve(app) as client:
        await healthy(db)
        await replay(False, REPLICA_URLS[:1])
        await client.post("/items/behind")
        await state_of(db, "lagging")
        status = db.replica_status()[0]
        assert status["lag_seconds"] > 0.3, status
        assert status["lag_bytes"] > 0, status
        assert {(await client.get("/role")).json() for _ in range(5)} == {"primary"}
        await replay(True, REPLICA_URLS[:1])
        await state_of(db, "healthy")
        assert db.replica_status()[0]["lag_bytes"] == 0
        assert (await client.get("/seen")).json() == {"names": ["behind"], "role": "replica"}


@pytest.fixture
def replica_restarted() -> Iterator[None]:
    """The test stops the first replica; it is running again afterwards, whatever happened."""
    require(PRIMARY_URL, *REPLICA_URLS)
    try:
        yield
    finally:
        script("start-replica")


async def test_a_stopped_replica_fails_no_request(table: None, replica_restarted: None) -> None:
    app, db = app_with(REPLICA_URLS[:1], read_your_writes=None)
    async with serve(app) as client:
        await healthy(db)
        for _ in range(3):  # the pool now holds connections to the replica
            assert (await client.get("/role")).json() == "replica"
        stopping = asyncio.get_running_loop().run_in_executor(None, script, "stop-replica")
        answers = []
        while not stopping.done():
            response = await client.get("/role")
            answers.append((response.status_code, response.json()))
        await stopping
        for _ in range(10):
            response = await client.get("/role")
            answers.append((response.status_code, response.json()))
        assert {status for status, _ in answers} == {200}, answers
        assert answers[-1] == (200, "primary")
        await state_of(db, "down")
        assert db.replica_status()[0]["error"]
        script("start-replica")
        await state_of(db, "healthy")
        assert (await client.get("/role")).json() == "replica"


async def test_a_replica_gone_between_checks_fails_no_request(
    table: None, replica_restarted: None
) -> None:
    """The first statement finds the pooled connection dead before any check noticed: the
    replica is marked down and the statement runs on the primary."""
    app, db = app_with(REPLICA_URLS[:1], read_your_writes=None, replica_check_interval=60)
    async with serve(app) as client:
        await healthy(db)
        assert (await client.get("/role")).json() == "replica"
        script("stop-replica")
        response = await client.get("/seen")
        assert response.status_code == 200
        assert response.json() == {"names": [], "role": "primary"}
        assert db.replica_status()[0]["state"] == "down"
        async with db(replica=True):
            assert await db.session.scalar(ROLE) == "primary"


async def test_a_promoted_replica_is_a_replica_no_more(table: None) -> None:
    port = 5436
    await asyncio.get_running_loop().run_in_executor(None, script, "scratch", str(port))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"
    try:
        app, db = app_with([url], read_your_writes=None)
        async with serve(app) as client:
            await healthy(db)
            assert (await client.get("/role")).json() == "replica"
            scratch = create_async_engine(url, poolclass=NullPool)
            async with scratch.connect() as connection:
                await connection.execute(text("SELECT pg_promote()"))
            await scratch.dispose()
            await state_of(db, "promoted")
            assert {(await client.get("/role")).json() for _ in range(5)} == {"primary"}
            assert db.replica_status()[0]["lag_seconds"] is None
    finally:
        await asyncio.get_running_loop().run_in_executor(None, script, "drop-scratch", str(port))


# -- PgBouncer --------------------------------------------------------------------------------


def _bouncer(driver: str) -> str:
    require(BOUNCER_URL)
    return BOUNCER_URL.replace("+asyncpg", f"+{driver}")


async def _load(db: Any, clients: int, transactions: int) -> list[str]:
    failures: list[str] = []

    async def client(number: int) -> None:
        for n in range(transactions):
            try:
                async with db(commit_on_exit=True):
                    assert await db.session.scalar(text("SELECT :n + 1"), {"n": n}) == n + 1
                    await db.session.scalar(select(items.c.name).where(items.c.id == number))
            except Exception as error:
                failures.append(f"{type(error).__name__}: {error}"[:200])

    await asyncio.gather(*(client(number) for number in range(clients)))
    return failures


@pytest.fixture
async def bounced_table() -> AsyncIterator[None]:
    require(BOUNCER_URL)
    engine = create_async_engine(
        BOUNCER_URL, poolclass=NullPool, **pgbouncer_engine_args(BOUNCER_URL)
    )
    async with engine.begin() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS items"))
        await connection.execute(
            text("CREATE TABLE items (id integer PRIMARY KEY, name varchar(50) UNIQUE)")
        )
    yield
    async with engine.begin() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS items"))
    await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_pgbouncer_transaction_pooling_with_the_preset(
    bounced_table: None, driver: str
) -> None:
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        unused_app,
        db_url=_bouncer(driver),
        pgbouncer=True,
        engine_args={"pool_size": 30, "max_overflow": 0},
        statement_timeout=5,
    )
    try:
        failures = await _load(db, clients=30, transactions=600)
    finally:
        await middleware.dispose()
    assert failures == []


async def test_without_the_preset_asyncpg_fails_behind_pgbouncer(bounced_table: None) -> None:
    """Why the preset exists: asyncpg's prepared statements meet other clients' connections."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        unused_app, db_url=_bouncer("asyncpg"), engine_args={"pool_size": 30, "max_overflow": 0}
    )
    try:
        failures = await _load(db, clients=30, transactions=40)
    finally:
        await middleware.dispose()
    assert failures
    assert all("prepared statement" in failure for failure in failures)


async def test_nothing_of_ours_leaks_session_state_through_pgbouncer(bounced_table: None) -> None:
    """A deadline is SET LOCAL (the transaction's): another client of the same server
    connections never sees it."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        unused_app,
        db_url=_bouncer("asyncpg"),
        pgbouncer=True,
        statement_timeout=3,
        engine_args={"pool_size": 10, "max_overflow": 0},
    )
    sent: list[str] = []
    event.listen(
        middleware.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: sent.append(statement),
    )
    other = create_async_engine(
        _bouncer("asyncpg"), poolclass=NullPool, **pgbouncer_engine_args(BOUNCER_URL)
    )
    try:
        await _load(db, clients=10, transactions=20)
        seen = set()
        for _ in range(40):
            async with other.connect() as connection:
                seen.add(await connection.scalar(text("SHOW statement_timeout")))
    finally:
        await middleware.dispose()
        await other.dispose()
    assert seen == {"0"}
    ours = [s for s in sent if s.lstrip().upper().startswith("SET")]
    assert ours
    assert all(s.startswith("SET LOCAL ") for s in ours), set(ours)


async def test_children_waiting_for_a_replica_to_catch_up_share_one_choice(table: None) -> None:
    """A request with a token whose write the replicas have not replayed yet: while its first
    child waits for a replica to catch up, the other children wait for that choice, and all
    of them read from the same server (the one that caught up), seeing the write."""
    app, db = app_with(REPLICA_URLS, replica_max_lag=60, replica_wait=2.0)

    @app.get("/gathered")
    async def gathered() -> list[Any]:
        async def child() -> list[Any]:
            names = list(await db.session.scalars(select(items.c.name)))
            return [await db.session.scalar(text("SELECT inet_server_port()")), names]

        async with db(multi_sessions=True):
            return await db.gather(*(child() for _ in range(4)))

    async with serve(app) as client:
        await healthy(db)
        await replay(False)
        assert (await client.post("/items/mine")).status_code == 200
        reading = asyncio.ensure_future(client.get("/gathered"))
        await asyncio.sleep(0.2)
        assert not reading.done()  # waiting for a replica to replay the write
        await replay(True)
        seen = (await reading).json()
    assert len({port for port, _ in seen}) == 1, seen
    assert all(names == ["mine"] for _, names in seen), seen
