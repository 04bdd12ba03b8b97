"""The middleware alone: its cost per request that never touches the database, to a tenth of a µs.

Runs in a contender's virtual environment. A bare ASGI app (no framework: two ``send`` calls)
is driven through driver.py with and without ``SQLAlchemyMiddleware`` around it, in alternating
batches in this one process; the difference of the medians is what the middleware adds. With no
framework and no database in the way, little else varies, so this is the least noisy figure of
the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import driver

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"7")]}
BODY = {"type": "http.response.body", "body": b'{"n":1}'}


async def bare(scope: Any, receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy.ext.asyncio import create_async_engine

    import fastapi_async_sqlalchemy
    from fastapi_async_sqlalchemy import SQLAlchemyMiddleware

    engine = create_async_engine(args.url)
    middleware = SQLAlchemyMiddleware(bare, custom_engine=engine)
    scope = driver.http_scope("GET", "/nodb")
    cpu: dict[str, list[float]] = {"bare": [], "middleware": []}
    try:
        for round_number in range(args.rounds):
            pair = [("bare", bare), ("middleware", middleware)]
            for name, app in pair if round_number % 2 == 0 else reversed(pair):
                start = time.process_time_ns()
                for _ in range(args.requests):
                    await driver.request(app, scope)
                cpu[name].append((time.process_time_ns() - start) / args.requests / 1000)
    finally:
        await engine.dispose()
    bare_us = statistics.median(cpu["bare"])
    with_us = statistics.median(cpu["middleware"])
    return {
        "package": str(fastapi_async_sqlalchemy.__version__),
        "bare_us": bare_us,
        "middleware_us": with_us,
        "overhead_us": with_us - bare_us,
        "overheads_us": [m - b for m, b in zip(cpu["middleware"], cpu["bare"], strict=True)],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="sqlite+aiosqlite:///:memory:")
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=10)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
