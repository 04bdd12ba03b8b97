"""The answer admission control gives when no permit frees up within request_queue_timeout:
its status, JSON body, Retry-After and content type, and that it comes after the queue timeout.

request_queue_timeout is 2 s (not 5, to keep the run short): a Retry-After derived from the
timeout would show as "2", not "1".
"""

import asyncio
import json

from _compat import Clock, Exchange, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    app = FastAPI()
    app.add_middleware(
        SQLAlchemyMiddleware, db_url=url(), max_concurrent_requests=1, request_queue_timeout=2
    )
    inside = asyncio.Event()
    release = asyncio.Event()

    @app.get("/")
    async def index() -> dict:
        await db.session.execute(text("SELECT 1"))
        inside.set()
        await release.wait()
        return {"ok": True}

    first = Exchange(app)
    await asyncio.wait_for(inside.wait(), 2)
    clock = Clock()
    second = Exchange(app)
    result: dict = {"second": await second.response(limit=4)}
    result["second_after_the_queue_timeout"] = clock.window(1.9, 5)
    result["body"] = json.loads(second.body())
    result["retry-after"] = second.header(b"retry-after")
    result["content-type"] = second.header(b"content-type")
    release.set()
    result["first"] = await first.response()
    result["second_call"] = await second.finish()
    return result


run(main)
