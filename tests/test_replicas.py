"""Read replicas (SPEC §16): where reads go, writes refused or moved, one replica per scope.

Each test runs on SQLite, PostgreSQL (a real primary with two streaming replicas) and MariaDB;
see ``tests/replicas.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Row, _next_id, items, new_item, only_on, serve, unused_app
from fastapi import FastAPI, Request
from replicas import Pair, healthy, pair_fixture, replicated_app  # noqa: F401 - the fixture
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from fastapi_async_sqlalchemy import (
    InvalidConfigurationError,
    ReplicaWriteError,
    create_middleware_and_session_proxy,
    pgbouncer_engine_args,
)
from fastapi_async_sqlalchemy.testing import isolated

pytestmark = pytest.mark.anyio

FAST = {"replica_check_interval": 0.05}


def replicated(pair: Pair, **options: Any) -> tuple[FastAPI, Any]:
    """An app on ``pair``'s primary and replicas (see ``replicas.replicated_app``)."""
    return replicated_app(pair.primary, pair.replicas, pair.role, **options)  # type: ignore[no-any-return]


async def test_reads_stay_on_the_primary_unless_asked(pair: Pair) -> None:
    app, db = replicated(pair)
    async with serve(app) as client:
        await healthy(db)
        assert (await client.get("/role")).json() == "primary"
        async with db():
            assert await db.session.scalar(pair.role) == "primary"
        async with db(replica=True):
            assert (await db.session.scalar(pair.role)).startswith("replica-")


async def test_replica_reads_rule_sends_get_requests_to_a_replica(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET", "HEAD"])
    async with serve(app) as client:
        await healthy(db)
        seen = {(await client.get("/role")).json() for _ in range(8)}
        assert seen == {"replica-a", "replica-b"}  # both replicas take their turn
        assert (await client.post("/role")).json() == "primary"


async def test_replica_reads_rule_can_be_a_function(pair: Pair) -> None:
    def reports(scope: dict[str, Any]) -> bool:
        return scope["method"] == "GET" and scope["path"].startswith("/role")

    app, db = replicated(pair, replica_reads=reports)
    async with serve(app) as client:
        await healthy(db)
        assert (await client.get("/role")).json().startswith("replica-")
        assert (await client.get("/names")).status_code == 200


async def test_one_replica_per_request_and_its_blocks(pair: Pair) -> None:
    """Every read of a request, its inner blocks and its gathered children: one replica."""
    app, db = replicated(pair, replica_reads=["GET"])

    @app.get("/many")
    async def many() -> list[str]:
        seen = [await db.session.scalar(pair.role)]
        async with db():
            seen.append(await db.session.scalar(pair.role))
        async with db(multi_sessions=True):

            async def child() -> str:
                return str(await db.session.scalar(pair.role))

            seen += await db.gather(*(child() for _ in range(4)))
        async with db(replica=False):
            seen.append("then " + await db.session.scalar(pair.role))
        return seen

    async with serve(app) as client:
        await healthy(db)
        for _ in range(4):
            seen = (await client.get("/many")).json()
            assert len(set(seen[:-1])) == 1, seen
            assert seen[0].startswith("replica-"), seen
            assert seen[-1] == "then primary"


async def test_gathered_children_of_a_replica_block_share_its_replica(pair: Pair) -> None:
    app, db = replicated(pair)
    async with serve(app):
        await healthy(db)
        for _ in range(4):
            async with db(multi_sessions=True, replica=True, max_concurrent=2):

                async def child() -> str:
                    return str(await db.session.scalar(pair.role))

                seen = await db.gather(*(child() for _ in range(6)))
            assert len(set(seen)) == 1, seen
            assert seen[0].startswith("replica-"), seen


@pytest.mark.parametrize("how", ["orm", "core", "text", "for update"])
async def test_a_write_in_a_replica_block_is_refused_before_it_is_sent(
    pair: Pair, how: str
) -> None:
    app, db = replicated(pair)
    async with serve(app):
        await healthy(db)
        with pytest.raises(ReplicaWriteError, match=r"open `async with db\(\):`"):
            async with db(replica=True, commit_on_exit=True):
                if how == "orm":
                    db.session.add(Row(id=_next_id(), name="orm"))
                    await db.session.flush()
                elif how == "core":
                    await db.session.execute(new_item("core"))
                elif how == "text":
                    await db.session.execute(
                        text("INSERT INTO items (id, name) VALUES (:i, 'text')"),
                        {"i": _next_id()},
                    )
                else:
                    await db.session.execute(select(items).with_for_update())
    assert await pair.names() == []
    for role in ("replica-a", "replica-b"):
        assert await pair.names(role) == []


async def test_a_write_the_database_refuses_is_a_replica_write_error(pair: Pair) -> None:
    """A write that cannot be told from a read reaches the replica's read-only transaction,
    and comes back as ReplicaWriteError (not a raw 25006 / 1792 / SQLITE_READONLY)."""
    app, db = replicated(pair)
    async with serve(app):
        await healthy(db)
        with pytest.raises(ReplicaWriteError, match="read-only transaction") as caught:
            async with db(replica=True):
                connection = await db.session.connection()
                await connection.exec_driver_sql(
                    f"INSERT INTO items (id, name) VALUES ({_next_id()}, 'raw')"
                )
        assert "replica=False" in str(caught.value)
        # The connection went back to its pool and the replica still serves reads.
        async with db(replica=True):
            assert (await db.session.scalar(pair.role)).startswith("replica-")
    for role in ("replica-a", "replica-b"):
        assert await pair.names(role) == []


async def test_a_write_moves_the_rest_of_a_replica_request_to_the_primary(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET"], commit_on_exit=True)

    @app.get("/visit/{name}")
    async def visit(name: str) -> list[str]:
        seen = [await db.session.scalar(pair.role)]
        if name.startswith("text"):
            await db.session.execute(
                text("INSERT INTO items (id, name) VALUES (:i, :n)"), {"i": _next_id(), "n": name}
            )
        else:
            db.session.add(Row(id=_next_id(), name=name))
            await db.session.flush()
        seen.append(await db.session.scalar(pair.role))
        async with db():
            seen.append(await db.session.scalar(pair.role))
        return seen

    async with serve(app) as client:
        await healthy(db)
        first = (await client.get("/visit/orm")).json()
        client.cookies.clear()  # the first one's token would send the second to the primary
        second = (await client.get("/visit/text")).json()
    for seen in (first, second):
        assert seen[0].startswith("replica-"), seen
        assert seen[1:] == ["primary", "primary"], seen
    assert await pair.names() == ["orm", "text"]  # committed on the primary


async def test_reads_go_to_the_primary_when_no_replica_answers(pair: Pair, tmp_path: Any) -> None:
    """Replicas that cannot be reached: no request fails, the primary serves, status says so."""
    if pair.name == "sqlite":
        dead = [f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'replica.sqlite3'}"]
    elif pair.name == "postgresql":
        dead = ["postgresql+asyncpg://postgres@127.0.0.1:1/test"]
    else:
        dead = ["mysql+asyncmy://root@127.0.0.1:1/test"]
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(
        Middleware, db_url=pair.primary, replica_urls=dead, replica_reads=["GET"], **FAST
    )

    @app.get("/role")
    async def role() -> str:
        return str(await db.session.scalar(pair.role))

    async with serve(app) as client:
        assert (await client.get("/role")).json() == "primary"  # before the first check
        for _ in range(200):
            if db.replica_status()[0]["state"] == "down":
                break
            await asyncio.sleep(0.02)
        status = db.replica_status()[0]
        assert status["state"] == "down", status
        assert status["error"], status
        assert (await client.get("/role")).json() == "primary"
        async with db(replica=True):
            assert await db.session.scalar(pair.role) == "primary"


async def test_replica_status_reports_each_replica(pair: Pair) -> None:
    app, db = replicated(pair)
    async with serve(app):
        await healthy(db)
        status = db.replica_status()
    assert [entry["state"] for entry in status] == ["healthy", "healthy"]
    for entry, url in zip(status, pair.replicas, strict=True):
        assert entry["lag_seconds"] == 0.0
        assert entry["error"] is None
        assert entry["checked_at"] > 0
        assert "password" not in entry["name"]
        assert entry["name"].endswith(url.rsplit("/", 1)[1])
    if pair.name == "postgresql":
        assert all(entry["lag_bytes"] is not None for entry in status)


async def test_replica_engines_are_the_callers(pair: Pair) -> None:
    """Caller-owned replica engines are used as given and never disposed."""
    engines = [create_async_engine(url) for url in pair.replicas]
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(unused_app, db_url=pair.primary, replica_engines=engines, **FAST)
    try:
        await healthy(db)
        async with db(replica=True):
            assert (await db.session.scalar(pair.role)).startswith("replica-")
    finally:
        await middleware.dispose()
    assert not sa_event.contains(engines[0].sync_engine, "handle_error", _refusal())
    # Still usable: the middleware did not dispose what it does not own, and (where the
    # "replica" is no real one) left its connections writable.
    async with engines[0].connect() as connection:
        assert await connection.scalar(pair.role) == "replica-a"
    if pair.name != "postgresql":
        async with engines[0].begin() as connection:
            await connection.execute(new_item("mine"))
    for engine in engines:
        await engine.dispose()


def _refusal() -> Any:
    from fastapi_async_sqlalchemy._read_only import refused_write as _refused_write

    return _refused_write


async def test_read_only_transactions_leave_nothing_behind(pair: Pair) -> None:
    """The read-only mode is the transaction's: the same pooled connections write afterwards."""
    app, db = replicated(pair)
    async with serve(app):
        await healthy(db)
        async with db(replica=True):
            await db.session.scalar(pair.role)
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("after"))
    assert await pair.names() == ["after"]


# -- read-your-writes tokens ------------------------------------------------------------------


async def test_a_committing_request_gets_a_token_and_a_reading_one_does_not(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET"])
    async with serve(app) as client:
        await healthy(db)
        read = await client.get("/names")
        assert "set-cookie" not in read.headers
        wrote = await client.post("/items/a")
        cookie = wrote.headers["set-cookie"]
    name = db._name.replace("#", "_") + "_position"
    assert cookie.startswith(f"{name}=")
    for attribute in ("HttpOnly", "SameSite=Lax", "Max-Age="):
        assert attribute in cookie


async def test_a_token_can_travel_in_a_header(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET"], read_your_writes="header")
    async with serve(app) as client:
        await healthy(db)
        wrote = await client.post("/items/a")
        header = "x-" + db._name.replace("#", "-") + "-position"
        assert header in wrote.headers
        assert "set-cookie" not in wrote.headers
        # The token reads the write back, wherever the primary's position lets it be read.
        read = await client.get("/names", headers={header: wrote.headers[header]})
        assert read.json() == ["a"]


async def test_read_your_writes_can_be_turned_off(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET"], read_your_writes=None)
    async with serve(app) as client:
        await healthy(db)
        assert "set-cookie" not in (await client.post("/items/a")).headers


async def test_forged_expired_or_foreign_tokens_are_ignored(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET"])
    other_app, other_db = replicated(pair, replica_reads=["GET"])
    name = db._name.replace("#", "_") + "_position"
    async with serve(app) as client, serve(other_app) as other:
        await healthy(db)
        await healthy(other_db)
        token = (await client.post("/items/a")).headers["set-cookie"].split(";")[0].split("=")[1]
        position, expires, signature = token.split(".")
        foreign = (await other.post("/items/b")).headers["set-cookie"].split(";")[0].split("=")[1]
        await pair.replayed()
        tokens = db._binding.router.tokens
        expired = f"{position}.{int(time.time()) - 1}"
        forged = [
            f"{position}.{int(expires) + 3600}.{signature}",  # longer life, same signature
            f"{'1' if position == '-' else '-'}.{expires}.{signature}",  # another position
            f"{position}.{expires}.",
            "garbage",
            f"{expired}.{tokens._sign(expired)}",  # signed, but expired
            foreign,  # the other proxy's: signed with another key
        ]
        for value in forged:
            client.cookies.clear()
            response = await client.get("/role", headers={"cookie": f"{name}={value}"})
            assert response.status_code == 200
            assert response.json().startswith("replica-"), value


async def test_a_token_reads_the_write_back(pair: Pair) -> None:
    """Right after a commit, a request carrying the token sees the row (replica or primary)."""
    app, db = replicated(pair, replica_reads=["GET"])
    async with serve(app) as client:
        await healthy(db)
        for n in range(10):
            await client.post(f"/items/row{n}")
            assert f"row{n}" in (await client.get("/names")).json()


@only_on("sqlite", "mariadb")  # PostgreSQL compares WAL positions: tests/test_replication.py
async def test_without_positions_a_token_reads_from_the_primary_until_it_expires(
    pair: Pair,
) -> None:
    """SQLite and MariaDB have no position to compare: the token's holder reads from the
    primary for the token's life."""
    app, db = replicated(pair, replica_reads=["GET"], replica_max_lag=0)
    async with serve(app) as client:
        await healthy(db)
        await client.post("/items/mine")
        assert (await client.get("/role")).json() == "primary"
        assert (await client.get("/names")).json() == ["mine"]
        client.cookies.clear()
        assert (await client.get("/role")).json().startswith("replica-")


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replica_reads": ["GET"]}, "replica_reads needs replicas"),
        ({"replica_urls": "sqlite+aiosqlite://"}, "replica_urls must be a list"),
        ({"replica_urls": [42]}, "db_url must be a string"),
        ({"replica_urls": ["sqlite:///replica.db"]}, "replica_urls names a synchronous driver"),
        ({"replica_urls": ["nosuch+driver://h/d"]}, "replica_urls names a dialect"),
        ({"replica_engines": ["x"]}, "replica_engines must hold AsyncEngines"),
        ({"replica_urls": ["postgresql+asyncpg://h/d"]}, "primary's database \\(sqlite\\)"),
        ({"replica_urls": ["sqlite+aiosqlite://"], "replica_reads": "GET"}, "HTTP methods"),
        ({"replica_urls": ["sqlite+aiosqlite://"], "replica_reads": [1]}, "HTTP methods"),
        ({"replica_urls": ["sqlite+aiosqlite://"], "replica_max_lag": -1}, "replica_max_lag"),
        ({"replica_urls": ["sqlite+aiosqlite://"], "replica_check_interval": 0}, "interval"),
        ({"replica_urls": ["sqlite+aiosqlite://"], "replica_wait": "1"}, "replica_wait"),
        ({"read_your_writes": "query"}, '"cookie", "header" or None'),
        ({"read_your_writes_secret": "short"}, "at least 16 characters"),
        ({"pgbouncer": True}, "pgbouncer=True is for PostgreSQL"),
    ],
)
def test_replica_arguments_are_checked_up_front(options: dict[str, Any], message: str) -> None:
    Middleware, db = create_middleware_and_session_proxy()
    with pytest.raises(InvalidConfigurationError, match=message):
        Middleware(unused_app, db_url="sqlite+aiosqlite://", **options)
    assert repr(db).endswith("(unbound)>")  # nothing was bound, nothing created


async def test_the_primary_engine_is_no_replica() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    Middleware, _ = create_middleware_and_session_proxy()
    with pytest.raises(InvalidConfigurationError, match="must not hold the primary's own engine"):
        Middleware(unused_app, custom_engine=engine, replica_engines=[engine])
    await engine.dispose()


def test_pgbouncer_engine_args_per_driver() -> None:
    assert pgbouncer_engine_args("postgresql+asyncpg://h/d") == {
        "connect_args": {"statement_cache_size": 0}
    }
    assert pgbouncer_engine_args("postgresql+psycopg://h/d", {"pool_size": 3}) == {
        "pool_size": 3,
        "connect_args": {"prepare_threshold": None},
    }
    mine = pgbouncer_engine_args(
        "postgresql+asyncpg://h/d", {"connect_args": {"statement_cache_size": 5, "ssl": True}}
    )
    assert mine == {"connect_args": {"statement_cache_size": 5, "ssl": True}}
    with pytest.raises(InvalidConfigurationError, match="asyncpg and psycopg"):
        pgbouncer_engine_args("postgresql+pg8000://h/d")


async def test_an_app_without_replicas_installs_nothing(database_url: str) -> None:
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(unused_app, db_url=database_url)
    try:
        assert middleware._router is None
        assert middleware._serve_http == middleware._http
        assert db.replica_status() == []
        engine = middleware.engine.sync_engine
        assert not sa_event.contains(engine, "handle_error", _refusal())
        assert len(engine.dispatch.commit) == 0
        async with db(replica=True):  # no replicas: the primary serves
            assert await db.session.scalar(text("SELECT 1")) == 1
            assert db.session.sync_session.get_bind() is engine
    finally:
        await middleware.dispose()


async def test_sessions_of_a_replicated_app_are_plain_sessions(pair: Pair) -> None:
    """The session class changes for routing only: isinstance checks of apps still hold."""
    app, db = replicated(pair)
    async with serve(app), db(replica=True):
        assert isinstance(db.session.sync_session, Session)


async def test_the_request_objects_are_untouched(pair: Pair) -> None:
    """Routing reads the token from the request's headers without consuming anything."""
    app, db = replicated(pair, replica_reads=["POST"])

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        body = await request.json()
        return {"body": body, "role": await db.session.scalar(pair.role)}

    async with serve(app) as client:
        await healthy(db)
        answer = (await client.post("/echo", json={"x": 1})).json()
    assert answer["body"] == {"x": 1}
    assert answer["role"].startswith("replica-")


def test_a_position_past_a_page_header_is_read_as_the_page_boundary() -> None:
    """Where an idle primary's insert position points past a WAL page header, the token asks
    for the boundary (no record ends inside a header); any other position is kept."""
    from fastapi_async_sqlalchemy._positions import parse_lsn, replayable

    page = 8192 * 1000
    assert replayable(page + 24, 8192) == page
    assert replayable(page + 25, 8192) == page + 25
    assert replayable(page + 40, 8192) == page + 40  # a segment's first page: kept
    assert replayable(page + 24, None) == page + 24  # page size not known yet: kept
    assert parse_lsn("16/B374D848") == (0x16 << 32) + 0xB374D848
    assert parse_lsn(None) is None


async def test_under_the_testing_kit_replicas_mirror_the_primary(pair: Pair) -> None:
    """In isolated(), replica reads see what the test wrote (on the primary's test
    connection), writes told from reads are still refused, nothing is left behind, and the
    health checks resume afterwards."""
    app, db = replicated(pair, replica_reads=["GET"])
    async with serve(app) as client:
        await healthy(db)
        async with isolated():
            assert (await client.post("/items/kit")).status_code == 200
            assert (await client.get("/names")).json() == ["kit"]
            async with db(replica=True):
                assert await db.session.scalar(select(func.count()).select_from(items)) == 1
            with pytest.raises(ReplicaWriteError):
                async with db(replica=True):
                    await db.session.execute(new_item("refused"))
        assert db.pool_status()["checked_out"] == 0
        checked = db.replica_status()[0]["checked_at"]
        for _ in range(250):
            if db.replica_status()[0]["checked_at"] != checked:
                break
            await asyncio.sleep(0.02)
        assert db.replica_status()[0]["checked_at"] != checked
    assert await pair.names() == []


# -- review regressions -------------------------------------------------------------------------


async def test_a_write_in_a_primary_block_moves_the_request_to_the_primary(pair: Pair) -> None:
    """`async with db(replica=False):` is where writes go that cannot be told from reads: after
    one, the request reads from the primary, and sees the write."""
    app, db = replicated(pair, replica_reads=["GET"])

    @app.get("/visit/{name}")
    async def visit(name: str) -> dict[str, Any]:
        before = await db.session.scalar(pair.role)
        async with db(replica=False, commit_on_exit=True):
            await db.session.execute(
                text("INSERT INTO items (id, name) VALUES (:i, :n)"), {"i": _next_id(), "n": name}
            )
        names = list(await db.session.scalars(select(items.c.name)))
        return {"before": before, "after": await db.session.scalar(pair.role), "names": names}

    async with serve(app) as client:
        await healthy(db)
        seen = (await client.get("/visit/a")).json()
    assert seen["before"].startswith("replica-")
    assert seen["after"] == "primary"
    assert seen["names"] == ["a"]


@pytest.mark.parametrize("block", ["statement_timeout", "info"])
async def test_a_commit_in_a_block_with_its_own_options_gets_a_token(
    pair: Pair, block: str
) -> None:
    app, db = replicated(pair, replica_reads=["GET"])
    options: dict[str, Any] = (
        {"statement_timeout": 5}
        if block == "statement_timeout"
        else {"session_args": {"info": {"x": 1}}}
    )

    @app.post("/block/{name}")
    async def add(name: str) -> str:
        async with db(commit_on_exit=True, **options):
            await db.session.execute(new_item(name))
        return name

    async with serve(app) as client:
        await healthy(db)
        wrote = await client.post("/block/mine")
        assert "set-cookie" in wrote.headers
        assert (await client.get("/names")).json() == ["mine"]


async def test_writes_are_told_from_reads_by_their_text(pair: Pair) -> None:
    """An INSERT ... RETURNING through text().columns() is a write (it moves the request);
    reads behind a comment or a WITH are sent to the replica."""
    app, db = replicated(pair, replica_reads=["GET"])

    @app.get("/returning")
    async def returning() -> list[Any]:
        first = await db.session.scalar(pair.role)
        statement = text("INSERT INTO items (id, name) VALUES (:i, 'ret') RETURNING id").columns(
            items.c.id
        )
        await db.session.execute(statement, {"i": _next_id()})
        after = await db.session.scalar(pair.role)
        await db.session.commit()
        return [first, after]

    async with serve(app) as client:
        await healthy(db)
        seen = (await client.get("/returning")).json()
        assert seen[0].startswith("replica-")
        assert seen[1] == "primary"
        async with db(replica=True):
            for read in (
                "-- the count\nSELECT count(*) FROM items",
                "/* the count */ SELECT count(*) FROM items",
                "WITH n AS (SELECT count(*) AS c FROM items) SELECT c FROM n",
            ):
                assert await db.session.scalar(text(read)) is not None
    assert await pair.names() == ["ret"]


@only_on("sqlite")  # replicas that vanish between two checks: files that move away
async def test_every_replica_gone_between_checks_fails_no_request(pair: Pair) -> None:
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(
        Middleware,
        db_url=pair.primary,
        replica_urls=pair.replicas,
        replica_reads=["GET"],
        replica_check_interval=60,
        engine_args={"poolclass": NullPool},
    )

    @app.get("/role")
    async def role() -> str:
        return str(await db.session.scalar(pair.role))

    async with serve(app) as client:
        await healthy(db)
        for url in pair.replicas:
            _vanish(url)
        try:
            answer = await client.get("/role")
            assert answer.status_code == 200
            assert answer.json() == "primary"
            assert [s["state"] for s in db.replica_status()] == ["down", "down"]
        finally:
            for url in pair.replicas:
                _vanish(url, back=True)


def _vanish(url: str, back: bool = False) -> None:
    """The SQLite file of ``url`` moves away, a directory taking its place (which cannot be
    opened); or, ``back``, returns."""
    path = Path(url.split("///", 1)[1])
    if back:
        path.rmdir()
        path.with_suffix(".gone").rename(path)
    else:
        path.rename(path.with_suffix(".gone"))
        path.mkdir()


async def test_replica_statements_count_in_stats_and_obey_deadlines(pair: Pair) -> None:
    from test_statement_timeouts import LONG

    app, db = replicated(pair, replica_reads=["GET"], stats=True, statement_timeout=0.3)

    @app.get("/count")
    async def count() -> dict[str, Any]:
        await db.session.scalar(select(func.count()).select_from(items))
        return {"role": await db.session.scalar(pair.role), "statements": db.stats.statements}

    @app.get("/long")
    async def long() -> None:
        await db.session.execute(text(LONG[pair.name]))

    async with serve(app) as client:
        await healthy(db)
        counted = (await client.get("/count")).json()
        assert counted["role"].startswith("replica-")
        # The two, and a statement of ours that makes the transaction read-only or limits it.
        assert counted["statements"] == 3
        started = time.monotonic()
        stopped = await client.get("/long")
        assert stopped.status_code == 503  # StatementTimeoutError's answer
        assert time.monotonic() - started < 1.5
        assert [s["state"] for s in db.replica_status()] == ["healthy", "healthy"]


async def test_a_token_with_bytes_beyond_ascii_is_ignored(pair: Pair) -> None:
    app, db = replicated(pair, replica_reads=["GET"])
    name = db._name.replace("#", "_") + "_position"
    async with serve(app) as client:
        await healthy(db)
        response = await client.get(
            "/role", headers={"cookie": f"{name}=-.1.\xe9".encode("latin-1")}
        )
        assert response.status_code == 200
        assert response.json().startswith("replica-")


async def test_the_checks_stay_stopped_after_dispose(pair: Pair) -> None:
    """With custom_engine the proxy stays bound after dispose(); a replica block then uses the
    primary and starts no background task."""
    engine = create_async_engine(pair.primary)
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        unused_app, custom_engine=engine, replica_urls=pair.replicas, replica_check_interval=0.05
    )
    await healthy(db)
    await middleware.dispose()
    async with db(replica=True):
        assert await db.session.scalar(pair.role) == "primary"
    await asyncio.sleep(0.1)
    assert not [t for t in asyncio.all_tasks() if t.get_name().endswith(" replicas")]
    await engine.dispose()


async def test_an_error_of_a_statement_is_no_lost_replica(pair: Pair) -> None:
    """A statement's own error (here under the testing kit, where the replica is the test's
    connection) is raised once, and no replica is marked down."""
    from fastapi_async_sqlalchemy.testing import capture_queries

    app, db = replicated(pair, replica_reads=["GET"])

    @app.get("/broken")
    async def broken() -> None:
        await db.session.execute(text("SELECT nope FROM items"))

    async with serve(app) as client:
        await healthy(db)
        assert (await client.get("/broken")).status_code == 500
        async with isolated():
            with capture_queries() as queries:
                assert (await client.get("/broken")).status_code == 500
        assert [q.statement for q in queries].count("SELECT nope FROM items") == 1
        assert [s["state"] for s in db.replica_status()] == ["healthy", "healthy"]


async def test_a_lost_commit_on_the_primary_is_never_taken_for_a_lost_replica(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block that read on the replica, then wrote on the primary (the request was moved there
    by an inner block's write): its COMMIT failing with a lost connection is the request's
    failure, not a replica going away."""
    app, db = replicated(pair, replica_reads=["GET"])
    failing = {"armed": False}

    @app.get("/visit")
    async def visit() -> str:
        async with db(commit_on_exit=True):
            role = str(await db.session.scalar(pair.role))
            async with db(commit_on_exit=True):
                await db.session.execute(new_item("audit"))
            await db.session.execute(new_item("last-seen"))
            failing["armed"] = True
        return role

    async with serve(app) as client:
        await healthy(db)
        dialect = db.engine.sync_engine.dialect
        commit = dialect.do_commit

        def do_commit(dbapi_connection: Any) -> None:
            if failing["armed"]:
                failing["armed"] = False
                raise dialect.loaded_dbapi.OperationalError("connection lost")
            commit(dbapi_connection)

        monkeypatch.setattr(dialect, "do_commit", do_commit)
        monkeypatch.setattr(dialect, "is_disconnect", lambda *args: True)
        assert (await client.get("/visit")).status_code == 500
        assert [s["state"] for s in db.replica_status()] == ["healthy", "healthy"]
        assert db.pool_status()["checked_out"] == 0
    assert await pair.names() == ["audit"]


async def test_a_replica_lost_before_the_rollback_fails_no_request(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request read from a replica, which went away before its transaction was rolled
    back: nothing is lost, the answer stands, the replica is marked down, no connection kept."""
    app, db = replicated(pair, replica_reads=["GET"], read_your_writes=None)
    armed = {"rollbacks": 1}
    async with serve(app) as client:
        await healthy(db)
        replicas = db._binding.router.replicas.replicas
        for replica in replicas:
            dialect = replica.engine.sync_engine.dialect
            rollback = dialect.do_rollback

            def do_rollback(
                dbapi_connection: Any, rollback: Any = rollback, d: Any = dialect
            ) -> None:
                if armed["rollbacks"]:
                    armed["rollbacks"] -= 1
                    raise d.loaded_dbapi.OperationalError("server closed the connection")
                rollback(dbapi_connection)

            monkeypatch.setattr(dialect, "do_rollback", do_rollback)
            monkeypatch.setattr(dialect, "is_disconnect", lambda *args: True)
        answer = await client.get("/role")
        assert answer.status_code == 200
        assert answer.json().startswith("replica-")
        assert sorted(s["state"] for s in db.replica_status()) == ["down", "healthy"]
        for replica in replicas:
            assert replica.engine.sync_engine.pool.checkedout() == 0


def test_gtid_positions_are_compared_domain_by_domain() -> None:
    from fastapi_async_sqlalchemy._positions import GtidPositions, parse_gtids

    positions = GtidPositions()
    assert parse_gtids("0-1-42,1-2-7") == {0: 42, 1: 7}
    assert positions.reached("0-1-42,1-2-7", "0-1-40")
    assert positions.reached("0-1-42,1-2-7", "0-2-42,1-1-7")  # the server id does not matter
    assert not positions.reached("0-1-42", "0-1-42,1-2-1")  # a domain not applied yet
    assert not positions.reached("0-1-41", "0-1-42")
    assert not positions.reached(None, "0-1-1")


@pytest.mark.parametrize("position", ["0-1-42,1-2-7", 0x16B374D848, None])
def test_a_token_gives_back_the_position_it_was_issued_for(position: Any) -> None:
    from fastapi_async_sqlalchemy._tokens import UNREACHABLE, Tokens

    tokens = Tokens(b"k" * 32, "cookie", "db_position", 10)
    name, value = tokens.issue(position, secure=True)
    assert name == b"set-cookie"
    assert b"; Secure" in value
    cookie = value.split(b";")[0]
    assert b"," not in cookie  # no comma in a cookie value
    read = tokens.read({"headers": [(b"cookie", b"other=1; " + cookie)]})
    assert read == (UNREACHABLE if position is None else position)
