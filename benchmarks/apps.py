"""The contenders: one FastAPI app per (contender, scenario), all on the same engine.

Every app answers the same routes with the same JSON body, so the only difference between two
contenders is how the route gets its database session:

- ``floor``: no database work at all (the cost of FastAPI, the driver and the JSON response).
- ``raw``: the route opens ``async with sessionmaker() as session:`` itself.
- ``depends``: FastAPI's documented ``Depends`` + ``yield`` session dependency.
- ``ours`` / ``published``: ``SQLAlchemyMiddleware`` + ``db.session``. Both import
  ``fastapi_async_sqlalchemy``; which package that is depends on the virtual environment the
  worker runs in (this project, or 0.8.1 from PyPI), so the app code is the same for both.

Scenarios (see docs/performance.md):

- ``nodb``: ``GET /nodb`` never touches the database.
- ``select1``: ``GET /select1`` runs ``SELECT 1`` on the request's session.
- ``insert``: ``POST /insert`` runs one INSERT; committed by the route (raw, depends) or by the
  middleware's ``commit_on_exit=True`` (ours, published).
- ``gather``: ``GET /gather`` runs 4 ``SELECT 1`` concurrently, one session each, at most
  ``GATHER_LIMIT`` at a time: ``db.gather`` in ``db(multi_sessions=True, max_concurrent=...)``
  for the middleware, ``asyncio.gather`` over hand-made sessions and a semaphore for raw.
- ``concurrent``: ``GET /select1`` with 50 requests in flight at once.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

CONTENDERS = ("floor", "raw", "depends", "ours", "published")
SCENARIOS = ("nodb", "select1", "insert", "gather", "concurrent")

GATHER_QUERIES = 4
GATHER_LIMIT = 2

SELECT_1 = text("SELECT 1")
INSERT = text("INSERT INTO bench_items (name) VALUES (:name)")

# (method, path) each scenario requests.
ROUTES: dict[str, tuple[str, str]] = {
    "nodb": ("GET", "/nodb"),
    "select1": ("GET", "/select1"),
    "insert": ("POST", "/insert"),
    "gather": ("GET", "/gather"),
    "concurrent": ("GET", "/select1"),
}
# The body every route answers with, for every contender: checked on the first request.
EXPECTED_BODY = {
    "nodb": b'{"n":1}',
    "select1": b'{"n":1}',
    "insert": b'{"n":1}',
    "gather": b'{"n":4}',
    "concurrent": b'{"n":1}',
}


def build_app(contender: str, scenario: str, engine: AsyncEngine) -> FastAPI:
    """The app of ``contender`` for ``scenario`` (its routes for the other scenarios too)."""
    builders = {
        "floor": _floor,
        "raw": _raw,
        "depends": _depends,
        "ours": _middleware,
        "published": _middleware,
    }
    return builders[contender](scenario, engine)


def _floor(scenario: str, engine: AsyncEngine) -> FastAPI:
    app = FastAPI()

    @app.get("/nodb")
    async def nodb() -> dict[str, int]:
        return {"n": 1}

    @app.get("/select1")
    async def select1() -> dict[str, int]:
        return {"n": 1}

    @app.post("/insert")
    async def insert() -> dict[str, int]:
        return {"n": 1}

    @app.get("/gather")
    async def gather() -> dict[str, int]:
        return {"n": GATHER_QUERIES}

    return app


def _raw(scenario: str, engine: AsyncEngine) -> FastAPI:
    app = FastAPI()
    factory = async_sessionmaker(engine, expire_on_commit=False)

    @app.get("/nodb")
    async def nodb() -> dict[str, int]:
        return {"n": 1}

    @app.get("/select1")
    async def select1() -> dict[str, int]:
        async with factory() as session:
            value = (await session.execute(SELECT_1)).scalar_one()
        return {"n": value}

    @app.post("/insert")
    async def insert() -> dict[str, int]:
        async with factory() as session:
            await session.execute(INSERT, {"name": "raw"})
            await session.commit()
        return {"n": 1}

    async def one(slots: asyncio.Semaphore) -> int:
        async with slots, factory() as session:
            value: int = (await session.execute(SELECT_1)).scalar_one()
            return value

    @app.get("/gather")
    async def gather() -> dict[str, int]:
        slots = asyncio.Semaphore(GATHER_LIMIT)
        values = await asyncio.gather(*(one(slots) for _ in range(GATHER_QUERIES)))
        return {"n": sum(values)}

    return app


def _depends(scenario: str, engine: AsyncEngine) -> FastAPI:
    """FastAPI's documented pattern: a ``yield`` dependency hands each route its session."""
    app = FastAPI()
    factory = async_sessionmaker(engine, expire_on_commit=False)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    @app.get("/nodb")
    async def nodb() -> dict[str, int]:
        return {"n": 1}

    @app.get("/select1")
    async def select1(session: Annotated[AsyncSession, Depends(get_session)]) -> dict[str, int]:
        return {"n": (await session.execute(SELECT_1)).scalar_one()}

    @app.post("/insert")
    async def insert(session: Annotated[AsyncSession, Depends(get_session)]) -> dict[str, int]:
        await session.execute(INSERT, {"name": "depends"})
        await session.commit()
        return {"n": 1}

    # One session per request cannot run 4 queries at once: no gather route (not a contender).
    return app


def _middleware(scenario: str, engine: AsyncEngine) -> FastAPI:
    from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

    app = FastAPI()
    app.add_middleware(
        SQLAlchemyMiddleware,
        custom_engine=engine,
        commit_on_exit=scenario == "insert",
    )

    @app.get("/nodb")
    async def nodb() -> dict[str, int]:
        return {"n": 1}

    @app.get("/select1")
    async def select1() -> dict[str, int]:
        return {"n": (await db.session.execute(SELECT_1)).scalar_one()}

    @app.post("/insert")
    async def insert() -> dict[str, int]:
        await db.session.execute(INSERT, {"name": "middleware"})
        return {"n": 1}

    async def one() -> int:
        value: int = (await db.session.execute(SELECT_1)).scalar_one()
        return value

    @app.get("/gather")
    async def gather() -> dict[str, int]:
        async with db(multi_sessions=True, max_concurrent=GATHER_LIMIT):
            values: list[Any] = await db.gather(*(one() for _ in range(GATHER_QUERIES)))
        return {"n": sum(values)}

    return app


def runs(contender: str, scenario: str) -> bool:
    """Whether ``contender`` takes part in ``scenario``."""
    return not (contender == "depends" and scenario == "gather")
