"""A middleware given a custom_engine never disposes it nor lets go of the proxy: after the
app's lifespan has shut down, ``async with db():`` still works on that engine."""

from _compat import Lifespan, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    engine = create_async_engine(url())
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, custom_engine=engine)
    lifespan = Lifespan(app)
    result = {
        "startup": await lifespan.step("lifespan.startup"),
        "shutdown": await lifespan.step("lifespan.shutdown"),
    }
    try:
        async with db():
            result["after_shutdown"] = (await db.session.execute(text("SELECT 1"))).scalar_one()
    except Exception as exc:
        result["after_shutdown"] = {"raised": kinds(exc)}
    await engine.dispose()
    return result


run(main)
