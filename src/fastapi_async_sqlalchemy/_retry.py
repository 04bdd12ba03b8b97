"""Retrying a unit of work after a serialization failure or a deadlock.

:func:`is_retryable` decides by the database's error code, never by exception class: asyncpg's
serialization failures reach SQLAlchemy as a plain ``DBAPIError``, and one exception class can
carry retryable and fatal codes alike. :func:`run_in_transaction` runs the work in a fresh scope
per attempt, commits it, and on a retryable error rolls back, waits (exponential backoff with
full jitter) and runs it again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .exceptions import CommitCallbackError, TransactionStateError

if TYPE_CHECKING:
    from ._proxy import DBSessionMeta

T = TypeVar("T")

# PostgreSQL SQLSTATEs: serialization_failure, deadlock_detected.
_POSTGRESQL = frozenset({"40001", "40P01"})
# MySQL/MariaDB: ER_LOCK_DEADLOCK (the transaction was rolled back).
_MYSQL = frozenset({1213})
_MYSQL_DRIVERS = ("asyncmy", "aiomysql", "pymysql", "MySQLdb", "mysql")
# SQLite's primary result codes SQLITE_BUSY and SQLITE_LOCKED ("database is locked").
_SQLITE = frozenset({5, 6})


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a serialization failure or a deadlock, so the transaction may succeed
    if it is run again: PostgreSQL SQLSTATE 40001 or 40P01 (asyncpg, psycopg), MySQL/MariaDB
    error 1213, SQLite "database is locked". Looks through SQLAlchemy's wrapper (``.orig``) and
    the exception's causes."""
    for error in _causes(exc):
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(code, str) and code in _POSTGRESQL:
            return True
        sqlite_code = getattr(error, "sqlite_errorcode", None)
        if isinstance(sqlite_code, int) and sqlite_code & 0xFF in _SQLITE:
            return True
        if (
            type(error).__module__.split(".")[0] in _MYSQL_DRIVERS
            and error.args
            and error.args[0] in _MYSQL
        ):
            return True
    return False


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the DBAPI error SQLAlchemy wrapped, and their explicit causes, each once.

    Not ``__context__``: an error raised while handling a deadlock (say an HTTPException) is
    not a deadlock.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending and len(seen) < 16:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        orig = getattr(error, "orig", None)
        pending += [error.__cause__, orig if isinstance(orig, BaseException) else None]


async def run_in_transaction(
    proxy: DBSessionMeta,
    work: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    attempts: int,
    backoff: float,
    max_backoff: float,
    deadline: float | None,
) -> T:
    """Run ``work`` in a fresh committed scope of ``proxy``, again after retryable errors."""
    if proxy._in_transaction():
        raise TransactionStateError(
            "run_in_transaction() was called where this proxy's session already has an open "
            "transaction, which a retry could not undo: call it before the first query of the "
            "request (or the block), or commit first."
        )
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            async with proxy(commit_on_exit=True):
                return await work(*args, **kwargs)
        except CommitCallbackError:
            raise  # committed: running the work again would do it twice
        except Exception as exc:
            if not is_retryable(exc):
                raise
            wait = random.uniform(0, min(max_backoff, backoff * 2 ** (attempt - 1)))
            out_of_time = deadline is not None and (time.monotonic() - started + wait >= deadline)
            if attempt >= attempts or out_of_time:
                reason = "the deadline" if out_of_time and attempt < attempts else "attempts"
                exc.add_note(
                    f"run_in_transaction() gave up after {attempt} attempt(s) (out of "
                    f"{reason}); the last error is shown."
                )
                raise
        await asyncio.sleep(wait)
