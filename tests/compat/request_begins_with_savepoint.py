"""A route whose first database call is begin_nested() (SQLAlchemy then marks the transaction
around the savepoint as begun explicitly): with commit_on_exit, the request's work is committed
at the end, the savepoint's and the rest."""

from _compat import Exchange, committed_rows, create_table, drop_table, items, run, url
from fastapi import FastAPI

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    await create_table()
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db_url=url(), commit_on_exit=True)

    @app.get("/")
    async def index() -> dict:
        async with db.session.begin_nested():
            await db.session.execute(items.insert().values(id=1, name="in the savepoint"))
        savepoint = await db.session.begin_nested()
        await db.session.execute(items.insert().values(id=2, name="rolled back"))
        await savepoint.rollback()
        await db.session.execute(items.insert().values(id=3, name="after it"))
        return {"ok": True}

    exchange = Exchange(app)
    result = {"response": await exchange.response(), "call": await exchange.finish()}
    result["committed_rows"] = await committed_rows()
    await drop_table()
    return result


run(main)
