"""Memory over many requests through the middleware: RSS growth and growing allocation sites.

Runs in the contender's virtual environment (this project, or 0.8.1 from PyPI: both import
``fastapi_async_sqlalchemy``), in-process through driver.py, on SQLite:

1. warm-up requests, then ``gc.collect()`` and the resident set size (RSS);
2. ``--requests`` requests, RSS read every fifth of them (after ``gc.collect()``);
3. live session objects counted (a leaked session stays reachable);
4. tracemalloc: a snapshot, ``--trace-requests`` more requests, a second snapshot; the sites
   whose allocations grew the most, overall and in the package.

Every request reads ``db.session`` (so a session is created and finalized each time, with
``commit_on_exit=True``); every ``--io-every``-th one also runs an INSERT on it, which checks a
connection out of the pool, commits and returns it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import driver
from worker import make_engine, prepare


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_app(engine: Any, io_every: int) -> Any:
    from fastapi import FastAPI
    from sqlalchemy import text

    from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, custom_engine=engine, commit_on_exit=True)
    counter = itertools.count()
    insert = text("INSERT INTO bench_items (name) VALUES (:name)")

    @app.post("/memory")
    async def memory() -> dict[str, int]:
        session = db.session
        if next(counter) % io_every == 0:
            await session.execute(insert, {"name": "memory"})
        return {"n": 1}

    return app


def _package_dir() -> str:
    import fastapi_async_sqlalchemy

    return os.path.dirname(os.path.realpath(fastapi_async_sqlalchemy.__file__))


def live_sessions() -> int:
    from sqlalchemy.orm import Session

    return sum(1 for obj in gc.get_objects() if isinstance(obj, Session))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import fastapi_async_sqlalchemy

    package_dir = _package_dir()

    engine = make_engine("sqlite", args.url)
    await prepare(engine, "sqlite")
    app = build_app(engine, args.io_every)
    scope = driver.http_scope("POST", "/memory")

    async def run(count: int) -> None:
        await driver.serve(app, scope, count)

    try:
        async with driver.lifespan(app):
            await run(args.warmup)
            gc.collect()
            start = rss_kib()
            objects_start = len(gc.get_objects())
            started = time.perf_counter()
            checkpoints = []
            step = max(args.requests // 5, 1)
            done = 0
            while done < args.requests:
                count = min(step, args.requests - done)
                await run(count)
                done += count
                gc.collect()
                checkpoints.append({"requests": done, "rss_kib": rss_kib()})
            objects_end = len(gc.get_objects())
            sessions = live_sessions()

            requests_seconds = time.perf_counter() - started
            tracemalloc.start(1)
            await run(min(1000, args.trace_requests))
            gc.collect()
            before = tracemalloc.take_snapshot()
            await run(args.trace_requests)
            gc.collect()
            middle = tracemalloc.take_snapshot()
            await run(args.trace_requests)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            trace_seconds = time.perf_counter() - started - requests_seconds
    finally:
        await engine.dispose()

    def site(stat: Any) -> dict[str, Any]:
        frame = stat.traceback[0]
        return {
            "site": f"{frame.filename}:{frame.lineno}",
            "size_diff": stat.size_diff,
            "count_diff": stat.count_diff,
        }

    # A site grows if it grew over both stretches of requests: a leak grows with every request,
    # while an object that merely happened to be alive at one snapshot (a task in flight, a
    # free list) shows up once and then stays level.
    by_line = after.compare_to(before, "lineno")
    first = {stat.traceback[0]: stat.size_diff for stat in middle.compare_to(before, "lineno")}
    second = {stat.traceback[0]: stat.size_diff for stat in after.compare_to(middle, "lineno")}
    growing = [
        stat
        for stat in by_line
        if stat.size_diff > 0
        and first.get(stat.traceback[0], 0) > 0
        and second.get(stat.traceback[0], 0) > 0
    ]
    ours = [stat for stat in growing if stat.traceback[0].filename.startswith(package_dir)]
    return {
        "package": str(fastapi_async_sqlalchemy.__version__),
        "requests": args.requests,
        "requests_seconds": round(requests_seconds, 1),
        "trace_seconds": round(trace_seconds, 1),
        "io_every": args.io_every,
        "warmup": args.warmup,
        "rss_start_kib": start,
        "rss_end_kib": checkpoints[-1]["rss_kib"],
        "checkpoints": checkpoints,
        "gc_objects_start": objects_start,
        "gc_objects_end": objects_end,
        "live_sessions": sessions,
        "trace_requests": args.trace_requests,
        "traced_growth_bytes": sum(stat.size_diff for stat in by_line),
        "top_growing_sites": [site(stat) for stat in growing[:8]],
        "package_growing_sites": [site(stat) for stat in ours[:8]],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=5_000)
    parser.add_argument("--trace-requests", type=int, default=10_000)
    parser.add_argument("--io-every", type=int, default=20)
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(main(arguments))))
