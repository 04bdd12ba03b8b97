"""One contender in one process: runs the scenarios and prints the timings as JSON.

benchmarks/run.py starts it (pinned to one CPU) in the contender's virtual environment:

    python worker.py --contender ours --db sqlite --url sqlite+aiosqlite:///... --mode inproc

``--mode inproc`` drives the app through the in-process ASGI driver (driver.py); ``--mode
uvicorn`` serves it with uvicorn on 127.0.0.1 and drives it with loadgen.py in a second process
pinned to ``--loadgen-cpus``. Each scenario: a fresh app on the process's engine, its lifespan
started, a warm-up, then ``--batches`` timed batches; the result of a batch is its wall time
divided by its request count (microseconds per request).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps
import driver

Timings = dict[str, list[float]]

HERE = Path(__file__).resolve().parent
CONCURRENCY = 50  # the "concurrent" scenario: requests in flight at once
UVICORN_CONNECTIONS = 4  # keep-alive connections for the other scenarios behind uvicorn

# Timed requests per scenario at --scale 1 (the warm-up adds a fifth): each scenario takes a
# fraction of a second on the 2-core machines this suite was written on.
REQUESTS = {"nodb": 1000, "select1": 150, "insert": 150, "gather": 50, "concurrent": 250}


# -- the database ----------------------------------------------------------------------------


def make_engine(db: str, url: str) -> AsyncEngine:
    engine = create_async_engine(url)
    if db == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=OFF")
            cursor.close()

    return engine


CREATE_TABLE = {
    "sqlite": "CREATE TABLE IF NOT EXISTS bench_items (id INTEGER PRIMARY KEY, name VARCHAR(50))",
    "postgresql": "CREATE TABLE IF NOT EXISTS bench_items "
    "(id SERIAL PRIMARY KEY, name VARCHAR(50))",
    "mariadb": "CREATE TABLE IF NOT EXISTS bench_items "
    "(id INTEGER AUTO_INCREMENT PRIMARY KEY, name VARCHAR(50))",
}
EMPTY_TABLE = {
    "sqlite": "DELETE FROM bench_items",
    "postgresql": "TRUNCATE bench_items",
    "mariadb": "TRUNCATE bench_items",
}


async def prepare(engine: AsyncEngine, db: str) -> None:
    async with engine.begin() as connection:
        if db == "sqlite":
            await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        await connection.exec_driver_sql(CREATE_TABLE[db])
        await connection.exec_driver_sql(EMPTY_TABLE[db])


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            (await connection.execute(text("SELECT count(*) FROM bench_items"))).scalar_one()
        )


# -- in-process ------------------------------------------------------------------------------


async def run_inproc(app: Any, scenario: str, total: int, batches: int) -> tuple[Timings, int]:
    method, path = apps.ROUTES[scenario]
    scope = driver.http_scope(method, path)
    expected = apps.EXPECTED_BODY[scenario]
    concurrency = CONCURRENCY if scenario == "concurrent" else 1

    async def batch(count: int) -> None:
        await driver.serve(app, scope, count, concurrency)

    first = await driver.request(app, scope)
    if first.status != 200 or first.body != expected:
        raise RuntimeError(f"{path}: HTTP {first.status} {first.body[:300]!r}, want {expected!r}")
    warmup = max(total // 5, concurrency)
    await batch(warmup)
    per_batch = max(total // batches, concurrency)
    timings: Timings = {"us": [], "cpu_us": []}
    for _ in range(batches):
        gc.collect()
        cpu = time.process_time_ns()
        start = time.perf_counter_ns()
        await batch(per_batch)
        timings["us"].append((time.perf_counter_ns() - start) / per_batch / 1000)
        timings["cpu_us"].append((time.process_time_ns() - cpu) / per_batch / 1000)
    return timings, 1 + warmup + per_batch * batches


# -- behind uvicorn --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_uvicorn(
    app: Any, scenario: str, total: int, batches: int, loadgen_cpus: str | None
) -> tuple[Timings, int]:
    """Serve ``app`` with uvicorn; loadgen.py (another process) sends the requests.

    loadgen prints a line when its warm-up ends and one after each timed segment; this process
    reads its own CPU time at each line, so a segment also gives the server's CPU time per
    request (the load generator's own CPU time is not in it).
    """
    import uvicorn

    method, path = apps.ROUTES[scenario]
    port = _free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    connections = CONCURRENCY if scenario == "concurrent" else UVICORN_CONNECTIONS
    warmup = max(total // 5, connections)
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        f"--port={port}",
        f"--method={method}",
        f"--path={path}",
        f"--requests={total}",
        f"--connections={connections}",
        f"--warmup={warmup}",
        f"--segments={batches}",
    ]
    if loadgen_cpus:
        command = ["taskset", "-c", loadgen_cpus, *command]
    timings: Timings = {"us": [], "cpu_us": []}
    try:
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        assert process.stdout is not None
        cpu = None
        per_segment = 1
        async for line in process.stdout:
            now = time.process_time_ns()
            event = json.loads(line)
            if "error" in event:
                raise RuntimeError(f"loadgen failed on {path}: {event['error']}")
            if "segment_seconds" in event:
                per_segment = event["requests_per_segment"]
                timings["us"].append(event["segment_seconds"] * 1e6 / per_segment)
                timings["cpu_us"].append((now - cpu) / per_segment / 1000)  # type: ignore[operator]
            cpu = now
        if await process.wait() != 0 or len(timings["us"]) != batches:
            raise RuntimeError(f"loadgen failed on {path} (exit code {process.returncode})")
    finally:
        server.should_exit = True
        await serving
    return timings, warmup + per_segment * batches


# -- one process, every scenario -------------------------------------------------------------


def package_version() -> str | None:
    try:
        import fastapi_async_sqlalchemy
    except ImportError:
        return None
    return str(fastapi_async_sqlalchemy.__version__)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    engine = make_engine(args.db, args.url)
    results: dict[str, dict[str, Timings]] = {}
    try:
        for mode in args.modes.split(","):
            for scenario in args.scenarios.split(","):
                if not apps.runs(args.contender, scenario):
                    continue
                await prepare(engine, args.db)
                app = apps.build_app(args.contender, scenario, engine)
                total = max(int(REQUESTS[scenario] * args.scale), args.batches)
                if mode == "inproc":
                    async with driver.lifespan(app):
                        timings, sent = await run_inproc(app, scenario, total, args.batches)
                else:
                    timings, sent = await run_uvicorn(
                        app, scenario, total, args.batches, args.loadgen_cpus
                    )
                if scenario == "insert" and args.contender != "floor":
                    rows = await count_rows(engine)
                    if rows != sent:
                        raise RuntimeError(f"insert: {sent} requests committed {rows} rows")
                results.setdefault(mode, {})[scenario] = timings
    finally:
        await engine.dispose()
    return {
        "contender": args.contender,
        "package": package_version(),
        "python": sys.version.split()[0],
        "cpus": sorted(os.sched_getaffinity(0)),
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contender", choices=apps.CONTENDERS, required=True)
    parser.add_argument("--db", choices=sorted(CREATE_TABLE), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--modes", default="inproc,uvicorn", help="inproc, uvicorn or both")
    parser.add_argument("--scenarios", default=",".join(apps.SCENARIOS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the request counts")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--loadgen-cpus", default=None, help="taskset CPU list for loadgen.py")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(main(arguments))))
