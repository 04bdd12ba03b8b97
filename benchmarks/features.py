"""What the transaction features cost, off and on: same-process A/B batches, CPU and wall time.

Each pair runs the same unit of work (``async with db(commit_on_exit=True):`` and one
``SELECT 1``) in alternating batches in this one process, without and with the feature:

- ``on_commit``: one ``db.on_commit()`` callback registered per transaction (it runs after the
  commit); the baseline is the same work in a process where on_commit was never called, so the
  figure includes the listeners being present;
- ``statement_timeout``: the block opened with ``statement_timeout=5`` (PostgreSQL: one
  ``SET LOCAL`` round trip per transaction; MariaDB: each statement rewritten; SQLite: a
  progress handler).

    python benchmarks/features.py --url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python benchmarks/features.py                     # SQLite in memory

Wall time includes the round trip to the server (what a request waits); CPU time is what the
process spends. Prints one line per feature: the medians and their difference, in µs per
transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

SELECT_1 = text("SELECT 1")


async def plain(count: int) -> None:
    for _ in range(count):
        async with db(commit_on_exit=True):
            await db.session.execute(SELECT_1)


async def with_on_commit(count: int) -> None:
    for _ in range(count):
        async with db(commit_on_exit=True):
            db.on_commit(_nothing)
            await db.session.execute(SELECT_1)


async def with_statement_timeout(count: int) -> None:
    for _ in range(count):
        async with db(commit_on_exit=True, statement_timeout=5):
            await db.session.execute(SELECT_1)


def _nothing() -> None:
    pass


async def compare(
    base: Callable[[int], Awaitable[None]],
    feature: Callable[[int], Awaitable[None]],
    count: int,
    rounds: int,
) -> dict[str, float]:
    samples: dict[str, list[float]] = {"base_cpu": [], "feature_cpu": [], "diff_wall": []}
    await base(count)
    await feature(count)
    for round_number in range(rounds):
        order = [("base", base), ("feature", feature)]
        if round_number % 2:
            order.reverse()
        wall: dict[str, float] = {}
        for name, work in order:
            cpu, started = time.process_time_ns(), time.perf_counter_ns()
            await work(count)
            samples[f"{name}_cpu"].append((time.process_time_ns() - cpu) / count / 1000)
            wall[name] = (time.perf_counter_ns() - started) / count / 1000
        samples["diff_wall"].append(wall["feature"] - wall["base"])
    base_cpu = statistics.median(samples["base_cpu"])
    feature_cpu = statistics.median(samples["feature_cpu"])
    return {
        "base_cpu": base_cpu,
        "feature_cpu": feature_cpu,
        "diff_cpu": feature_cpu - base_cpu,
        "diff_wall": statistics.median(samples["diff_wall"]),
    }


async def main(args: argparse.Namespace) -> None:
    middleware = SQLAlchemyMiddleware(app=None, db_url=args.url)
    try:
        results: dict[str, Any] = {}
        # statement_timeout first: the on_commit listeners, once added, stay for the process.
        results["statement_timeout"] = await compare(
            plain, with_statement_timeout, args.count, args.rounds
        )
        results["on_commit"] = await compare(plain, with_on_commit, args.count, args.rounds)
    finally:
        await middleware.dispose()
    print(f"µs per transaction on {middleware.engine.dialect.name}, median of {args.rounds}:")
    report(results)


def report(results: dict[str, dict[str, float]]) -> None:
    """One line per comparison: the CPU medians and their difference, the wall difference."""
    width = max(map(len, results), default=0) + 2
    for name, figures in results.items():
        print(
            f"  {name:{width}} CPU {figures['base_cpu']:8.2f} -> {figures['feature_cpu']:8.2f} "
            f"({figures['diff_cpu']:+.2f})   wall {figures['diff_wall']:+.2f}"
        )


def arguments(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="sqlite+aiosqlite://")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(arguments(__doc__)))
