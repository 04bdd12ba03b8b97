"""What observability costs, off and on: same-process A/B batches, CPU and wall time.

Two middlewares on the same database, one observing nothing (no listener installed) and one
with everything on (``server_timing``, ``slow_request_threshold``, ``n_plus_one_threshold``,
hence ``db.stats``), run the same work in alternating batches in this one process:

- ``per statement``: ``async with db():`` and 20 ``SELECT 1``; the difference is divided by 20;
- ``per request``: one request through a FastAPI app that runs one ``SELECT 1`` and commits
  (the observed one also sends ``Server-Timing``).

Statements on SQLite through aiosqlite cost a thread hop each (hundreds of µs, with as much
noise), which hides a microsecond; so the per-statement cost of the statement hook alone is also
measured on a synchronous in-memory SQLite engine: ``SELECT 1`` through a ``Connection`` without
and with the observer's listeners, alternating batches, with a ``DatabaseStats`` current.

It also measures the listener that tells a transaction ``begin_nested()`` began from one
``begin()`` began (every middleware installs it: the 0.8.1 drop-in fix), per request, removed
and present.

    python benchmarks/observability.py --url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python benchmarks/observability.py                     # SQLite in memory
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from contextvars import ContextVar
from typing import Any

import httpx
from fastapi import FastAPI
from features import arguments, compare, report
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session

from fastapi_async_sqlalchemy import DBSessionMeta, create_middleware_and_session_proxy
from fastapi_async_sqlalchemy._scope import _transaction_created
from fastapi_async_sqlalchemy._stats import DatabaseStats, Observer

SELECT_1 = text("SELECT 1")
STATEMENTS = 20


def statements(db: DBSessionMeta) -> Any:
    async def work(count: int) -> None:
        for _ in range(count):
            async with db():
                for _ in range(STATEMENTS):
                    await db.session.execute(SELECT_1)

    return work


def app_for(url: str, **options: Any) -> tuple[FastAPI, DBSessionMeta]:
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=url, commit_on_exit=True, **options)

    @app.get("/")
    async def index() -> None:
        await db.session.execute(SELECT_1)

    app.middleware_stack = app.build_middleware_stack()
    return app, db


def requests(client: httpx.AsyncClient) -> Any:
    async def work(count: int) -> None:
        for _ in range(count):
            (await client.get("/")).raise_for_status()

    return work


def listener_cost(rounds: int, count: int = 5000) -> dict[str, float]:
    """ns per statement the observer adds, median over rounds: its statement hook alone
    (``Connection.execute``), and the hook with its session class (``Session.execute``)."""
    var: ContextVar[DatabaseStats | None] = ContextVar("bench_stats", default=None)
    observer = Observer(
        var,
        server_timing=True,
        slow_request_threshold=10.0,
        n_plus_one_threshold=1_000_000,
        n_plus_one="warn",
    )
    hooks = [(name, hook) for name, hook in observer._listeners if name.startswith("do_")]
    engine = create_engine("sqlite://")
    var.set(DatabaseStats(None, observer))

    def batch(run: Any) -> float:
        started = time.perf_counter_ns()
        for _ in range(count):
            run(SELECT_1)
        return (time.perf_counter_ns() - started) / count

    figures: dict[str, list[float]] = {"base": [], "hook": [], "session_base": [], "session": []}
    plain, observed = Session(engine), observer.session_class(Session)(engine)
    with engine.connect() as connection:
        batch(connection.execute)
        for _ in range(rounds):
            figures["base"].append(batch(connection.execute))
            figures["session_base"].append(batch(plain.execute))
            for name, hook in hooks:
                event.listen(engine, name, hook)
            figures["hook"].append(batch(connection.execute) - figures["base"][-1])
            figures["session"].append(batch(observed.execute) - figures["session_base"][-1])
            for name, hook in hooks:
                event.remove(engine, name, hook)
    plain.close()
    observed.close()
    engine.dispose()
    return {name: statistics.median(values) for name, values in figures.items()}


async def main(args: argparse.Namespace) -> None:
    plain_app, plain_db = app_for(args.url)
    observed_app, observed_db = app_for(
        args.url, server_timing=True, slow_request_threshold=10.0, n_plus_one_threshold=50
    )
    results: dict[str, Any] = {}
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")
        for app in (plain_app, observed_app)
    ]
    try:
        per_statement = await compare(
            statements(plain_db), statements(observed_db), args.count, args.rounds
        )
        results["per statement"] = {key: value / STATEMENTS for key, value in per_statement.items()}
        results["per request"] = await compare(
            requests(clients[0]), requests(clients[1]), args.count, args.rounds
        )

        async def listener_removed(count: int) -> None:
            event.remove(Session, "after_transaction_create", _transaction_created)
            try:
                await requests(clients[0])(count)
            finally:
                event.listen(Session, "after_transaction_create", _transaction_created)

        results["savepoint-root listener"] = await compare(
            listener_removed, requests(clients[0]), args.count, args.rounds
        )
    finally:
        for client in clients:
            await client.aclose()
        for db in (plain_db, observed_db):
            await db._require_binding().owner.dispose()  # type: ignore[attr-defined]
    cost = listener_cost(args.rounds)
    print(
        f"per statement on sync SQLite (SELECT 1, {cost['base']:.0f} ns): the hook alone "
        f"{cost['hook']:+.0f} ns; through a Session ({cost['session_base']:.0f} ns), the hook "
        f"and the session class {cost['session']:+.0f} ns"
    )
    print(f"µs on {args.url.split(':')[0]}, median of {args.rounds} batches of {args.count}:")
    report(results)


if __name__ == "__main__":
    asyncio.run(main(arguments(__doc__)))
