"""Engine disposal failing at lifespan shutdown: whether the server is still told
lifespan.shutdown.complete, whether the app call then raises (and as what), and whether the
proxy is still bound afterwards."""

from _compat import Lifespan, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


def fail_disposal(engine: Engine) -> None:
    raise RuntimeError("disposal failed")


async def main() -> dict:
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db_url=url())
    lifespan = Lifespan(app)
    result: dict = {"startup": await lifespan.step("lifespan.startup")}
    async with db():
        await db.session.execute(text("SELECT 1"))
    event.listen(Engine, "engine_disposed", fail_disposal)
    try:
        result["shutdown"] = await lifespan.step("lifespan.shutdown")
    finally:
        event.remove(Engine, "engine_disposed", fail_disposal)
    try:
        async with db():
            await db.session.execute(text("SELECT 1"))
        result["db_after_shutdown"] = "ok"
    except Exception as exc:
        result["db_after_shutdown"] = {"raised": kinds(exc)}
    return result


run(main)
