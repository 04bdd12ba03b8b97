"""Typing promises, checked by `mypy --strict` from test_public_api.py; never run or collected.

Each `type: ignore` below is a promise too: mypy runs with `warn_unused_ignores`, so if a wrong
call stopped being an error, the unused ignore would fail the check. (They carry no error code:
which code mypy reports for a bad keyword depends on how Starlette types `add_middleware`.)
"""

from __future__ import annotations

from typing import assert_type

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    DBSessionType,
    SQLAlchemyMiddleware,
    create_middleware_and_session_proxy,
    db,
)

assert_type(db, DBSessionMeta)
assert_type(db.session, AsyncSession)


def session_of(x: DBSessionMeta) -> AsyncSession:
    return x.session


def session_of_legacy(x: DBSessionType) -> AsyncSession:
    return x.session


session_of(db)
session_of_legacy(db)

Middleware, other = create_middleware_and_session_proxy()
assert_type(other, DBSessionMeta)
assert_type(other.session, AsyncSession)

app = FastAPI()
app.add_middleware(SQLAlchemyMiddleware, db_url="sqlite+aiosqlite://", commit_on_exit=True)
app.add_middleware(Middleware, db_url="sqlite+aiosqlite://", session_args={"autoflush": False})
app.add_middleware(SQLAlchemyMiddleware, db_uri="sqlite+aiosqlite://")  # type: ignore
app.add_middleware(SQLAlchemyMiddleware, commit_on_exit="yes")  # type: ignore


async def explicit_scope() -> None:
    async with db() as x:
        assert_type(x, DBSessionMeta)
        assert_type(x.session, AsyncSession)
    async with db(session_args={"expire_on_commit": True}, commit_on_exit=True):
        assert_type(db.session, AsyncSession)
