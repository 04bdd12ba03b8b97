"""What replica routing costs a request: same-process A/B batches, CPU and wall time.

Two FastAPI apps on the same primary, one without replicas and one with them
(``replica_reads=["GET"]``, read-your-writes tokens on), run the same requests in alternating
batches in this one process:

- ``primary read``: a GET running one ``SELECT 1`` that both apps serve from the primary (the
  replicated app without ``replica_reads``): what routing costs a request it does not route;
- ``read``: the same GET, which the replicated app now reads from a replica (a route object,
  the replica's pick from the last check, a read-only transaction, another pool);
- ``write``: a POST that inserts a row and commits (the replicated app reads the primary's
  position after the commit and sets the token cookie: one more round trip on PostgreSQL).

    python benchmarks/replicas.py --url postgresql+asyncpg://postgres@127.0.0.1:5433/test \\
        --replica postgresql+asyncpg://postgres@127.0.0.1:5434/test    # scripts/replicas.sh
    python benchmarks/replicas.py      # SQLite files in /tmp (the "replica" is another file)

An app without replicas takes the path it took before replicas existed (nothing installed; the
middleware picks its request handler once), so that side needs no benchmark of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from typing import Any

import httpx
from fastapi import FastAPI
from features import compare, report
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_async_sqlalchemy import DBSessionMeta, create_middleware_and_session_proxy

SELECT_1 = text("SELECT 1")
_ids = itertools.count(1)


def app_for(url: str, **options: Any) -> tuple[FastAPI, DBSessionMeta]:
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=url, commit_on_exit=True, **options)

    @app.get("/read")
    async def read() -> int:
        return int(await db.session.scalar(SELECT_1))

    @app.post("/write")
    async def write() -> int:
        await db.session.execute(
            text("INSERT INTO bench_rows (id) VALUES (:id)"), {"id": next(_ids)}
        )
        return 1

    return app, db


def requests(app: FastAPI, method: str, path: str) -> Any:
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://bench")

    async def work(count: int) -> None:
        for _ in range(count):
            client.cookies.clear()  # every request without a token: the common case
            response = await client.request(method, path)
            assert response.status_code == 200, response.text

    return work


async def main(args: argparse.Namespace) -> None:
    setup = create_async_engine(args.url)
    async with setup.begin() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS bench_rows"))
        await connection.execute(text("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY)"))
    if args.url.startswith("sqlite"):
        replica = create_async_engine(args.replica)
        async with replica.begin() as connection:
            await connection.execute(text("SELECT 1"))
        await replica.dispose()
    plain, _ = app_for(args.url)
    replicated, replicated_db = app_for(
        args.url, replica_urls=[args.replica], replica_reads=["GET"]
    )
    unrouted, _ = app_for(args.url, replica_urls=[args.replica])
    middlewares = []
    for app in (plain, replicated, unrouted):
        app.middleware_stack = app.build_middleware_stack()
        middlewares.append(_middleware_of(app))
    try:
        for _ in range(200):  # the first check marks the replica healthy
            if replicated_db.replica_status()[0]["state"] == "healthy":
                break
            await asyncio.sleep(0.01)
        else:
            await requests(replicated, "GET", "/read")(1)  # starts the checks
            await asyncio.sleep(1.5)
        assert replicated_db.replica_status()[0]["state"] == "healthy"
        results = {
            "primary read": await compare(
                requests(plain, "GET", "/read"),
                requests(unrouted, "GET", "/read"),
                args.count,
                args.rounds,
            ),
            "read": await compare(
                requests(plain, "GET", "/read"),
                requests(replicated, "GET", "/read"),
                args.count,
                args.rounds,
            ),
            "write": await compare(
                requests(plain, "POST", "/write"),
                requests(replicated, "POST", "/write"),
                args.count,
                args.rounds,
            ),
        }
    finally:
        for middleware in middlewares:
            await middleware.dispose()
        async with setup.begin() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS bench_rows"))
        await setup.dispose()
    print(
        f"µs per request on {setup.dialect.name}, median of {args.rounds}, without -> with "
        "replicas:"
    )
    report(results)


def _middleware_of(app: FastAPI) -> Any:
    layer: Any = app.middleware_stack
    while not hasattr(layer, "dispose"):
        layer = layer.app
    return layer


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="sqlite+aiosqlite:////tmp/fasa-bench-primary.sqlite3")
    parser.add_argument("--replica", default="sqlite+aiosqlite:////tmp/fasa-bench-replica.sqlite3")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=11)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(arguments()))
