"""Admission control gives a request's permit back when its response is complete, not when its
background tasks finish: with max_concurrent_requests=1, a second request sent while the first
one's background task still runs is answered 200, not 503."""

import asyncio

from _compat import Exchange, Lifespan, run, url
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.background import BackgroundTask

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db_url=url(), max_concurrent_requests=1)
    release = asyncio.Event()
    background_started = asyncio.Event()

    async def slow_background() -> None:
        background_started.set()
        await release.wait()

    @app.get("/")
    async def index() -> JSONResponse:
        await db.session.execute(text("SELECT 1"))
        return JSONResponse({"ok": True}, background=BackgroundTask(slow_background))

    lifespan = Lifespan(app)
    result = {"startup": await lifespan.step("lifespan.startup")}

    first = Exchange(app)
    result["first"] = await first.response()
    await asyncio.wait_for(background_started.wait(), 2)
    second = Exchange(app)
    result["second_while_background_runs"] = await second.response()
    release.set()
    result["first_call"] = await first.finish()
    result["second_call"] = await second.finish()
    result["shutdown"] = await lifespan.step("lifespan.shutdown")
    return result


run(main)
