"""engine_args given together with custom_engine: whether construction is accepted (valid and
unknown keywords alike) and whether the engine's pool is left as the caller built it."""

from _compat import attempt, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from fastapi_async_sqlalchemy import create_middleware_and_session_proxy


async def main() -> dict:
    engine = create_async_engine(url(), pool_size=2, max_overflow=1)
    result: dict = {}
    for label, engine_args in (
        ("valid_engine_args", {"pool_size": 7}),
        ("unknown_engine_args", {"no_such_argument": 1}),
    ):
        Middleware, db = create_middleware_and_session_proxy()
        made: list = []
        outcome = attempt(
            lambda engine_args=engine_args, Middleware=Middleware, made=made: made.append(
                Middleware(FastAPI(), custom_engine=engine, engine_args=engine_args)
            )
        )
        if made:
            try:
                async with db():
                    outcome["select"] = (await db.session.execute(text("SELECT 1"))).scalar_one()
                    outcome["engine_is_custom"] = db.session.bind is engine
                outcome["pool_size"] = db.pool_status()["size"]
            except Exception as exc:
                outcome["block"] = {"raised": kinds(exc)}
            await made[0].dispose()
        result[label] = outcome
    await engine.dispose()
    return result


run(main)
