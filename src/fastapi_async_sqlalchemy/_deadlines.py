"""Statement deadlines: ``statement_timeout=S`` has the database stop a statement after S seconds.

Sessions opened with a deadline carry it in ``session.info``. When such a session begins a
transaction, the deadline goes on that transaction's ``Connection`` (an execution option, gone
with the transaction) and, per database:

- PostgreSQL: ``SET LOCAL statement_timeout`` (one round trip per transaction; transaction-local,
  so nothing is left for the next user of the pooled connection, nor through PgBouncer);
- MariaDB/MySQL: each statement is sent as ``SET STATEMENT max_statement_time=S FOR ...``;
- SQLite: a progress handler on the connection interrupts a statement past its deadline.

A statement stopped that way raises ``StatementTimeoutError``. Nothing here is installed until a
middleware or a ``db(...)`` block asks for a deadline.
"""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, SessionTransaction

from ._greenlet import await_
from .exceptions import StatementTimeoutError

KEY = "fastapi_async_sqlalchemy.statement_timeout"
_GUARD = "fastapi_async_sqlalchemy.statement_guard"

# Statements MariaDB runs under SET STATEMENT ... FOR (not BEGIN, SAVEPOINT and the like).
_MYSQL_LIMITED = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|WITH)\b", re.I)
_SQLITE_INTERRUPT = 9
_MYSQL_TIMEOUTS = frozenset({1969, 3024})  # MariaDB max_statement_time, MySQL max_execution_time


class _Installed:
    session = False  # the after_begin listener, on SQLAlchemy's Session class


_installed = _Installed()


def install(*engines: AsyncEngine) -> None:
    """Listen where deadlines need it: sessions (once per process) and each engine (once)."""
    if not _installed.session:
        event.listen(Session, "after_begin", _after_begin)
        _installed.session = True
    for engine in engines:
        _install_on(engine.sync_engine)


def _install_on(sync_engine: Engine) -> None:
    if event.contains(sync_engine, "handle_error", _handle_error):
        return
    event.listen(sync_engine, "handle_error", _handle_error)
    dialect = sync_engine.dialect.name
    if dialect in ("mysql", "mariadb"):
        event.listen(sync_engine, "before_cursor_execute", _mysql_statement, retval=True)
    elif dialect == "sqlite":
        event.listen(sync_engine, "before_cursor_execute", _sqlite_statement)
        event.listen(sync_engine, "after_cursor_execute", _sqlite_statement_done)


def with_deadline(session_args: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``session_args`` whose sessions carry the deadline (other ``info`` kept)."""
    info = dict(session_args.get("info") or {})
    info[KEY] = seconds
    return {**session_args, "info": info}


def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    seconds = session.info.get(KEY)
    if seconds is None:
        return
    connection.execution_options(**{KEY: seconds})
    if connection.dialect.name == "postgresql":
        milliseconds = max(1, round(seconds * 1000))
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")


def _mysql_statement(
    connection: Connection, cursor: Any, statement: str, parameters: Any, *_: Any
) -> tuple[str, Any]:
    seconds = connection.get_execution_options().get(KEY)
    if seconds is None or not _MYSQL_LIMITED.match(statement):
        return statement, parameters
    return f"SET STATEMENT max_statement_time={seconds:g} FOR {statement}", parameters


class _Guard:
    """The deadline of the statement running on one SQLite connection (None: no deadline).

    Its ``check`` is the connection's progress handler, called in the driver's thread.
    """

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline: float | None = None

    def check(self) -> int:
        deadline = self.deadline
        return 1 if deadline is not None and time.monotonic() > deadline else 0


def _sqlite_statement(connection: Connection, *_: Any) -> None:
    seconds = connection.get_execution_options().get(KEY)
    pooled = connection.connection
    guard: _Guard | None = pooled.info.get(_GUARD)
    if guard is None:
        if seconds is None:
            return
        guard = pooled.info[_GUARD] = _Guard()
        driver = pooled.driver_connection
        setter = getattr(driver, "set_progress_handler", None)
        if setter is None:  # pragma: no cover - a SQLite driver without progress handlers
            return
        result = setter(guard.check, 1000)
        if result is not None and hasattr(result, "__await__"):
            await_(result)  # aiosqlite: runs in its own thread
    guard.deadline = None if seconds is None else time.monotonic() + seconds


def _sqlite_statement_done(connection: Connection, *_: Any) -> None:
    """No deadline between statements: a COMMIT must never be interrupted."""
    guard: _Guard | None = connection.connection.info.get(_GUARD)
    if guard is not None:
        guard.deadline = None


def _handle_error(context: ExceptionContext) -> BaseException | None:
    connection = context.connection
    if connection is None:
        return None
    if connection.dialect.name == "sqlite" and not connection.invalidated:
        _sqlite_statement_done(connection)  # the statement failed: its deadline is over
    seconds = connection.get_execution_options().get(KEY)
    if seconds is None or not _is_timeout(context.original_exception):
        return None
    return StatementTimeoutError(seconds)


def _is_timeout(error: BaseException) -> bool:
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if code == "57014":  # PostgreSQL query_canceled
        return True
    sqlite_code = getattr(error, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int) and sqlite_code & 0xFF == _SQLITE_INTERRUPT:
        return True
    return bool(error.args) and error.args[0] in _MYSQL_TIMEOUTS
