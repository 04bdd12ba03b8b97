"""exclude_paths given as a bare string rather than a list: which paths then get a request
session and which are treated as excluded (db.session raises MissingSessionError)."""

import httpx
from _compat import kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

PATHS = ("/health", "/", "/h", "/other")


async def main() -> dict:
    app = FastAPI()

    async def probe() -> dict:
        try:
            return {"value": (await db.session.execute(text("SELECT 1"))).scalar_one()}
        except Exception as exc:
            return {"raised": kinds(exc)}

    for path in PATHS:
        app.add_api_route(path, probe)

    try:
        middleware = SQLAlchemyMiddleware(app, db_url=url(), exclude_paths="/health")
    except Exception as exc:
        return {"construction": {"raised": kinds(exc)}}
    result: dict = {"construction": "ok"}
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in PATHS:
            response = await client.get(path)
            result[path] = {"status": response.status_code, "route": response.json()}
    await middleware.dispose()
    return result


run(main)
