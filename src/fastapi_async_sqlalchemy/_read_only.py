"""Read-only transactions for replica sessions, and the errors of writes refused there.

Sessions reading from a replica (or from the primary standing in for one) use an engine that
shares the replica's pool with execution options of its own: on PostgreSQL
``postgresql_readonly`` (the driver begins ``BEGIN READ ONLY``, with no statement of its own); on
MariaDB a session event begins ``START TRANSACTION READ ONLY``; on SQLite the connections of the
replicas the middleware made are ``query_only``. A write the database refuses there becomes a
``ReplicaWriteError`` naming the fix.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from .exceptions import ReplicaWriteError

# Execution option of the engines that read: "replica", or "primary" for the primary's reads
# while no replica can serve them.
READ_ONLY = "fastapi_async_sqlalchemy.read_only"

# Why the database refused a write in a read-only transaction, per driver.
_READ_ONLY_SQLSTATE = "25006"
_MYSQL_READ_ONLY = 1792
_SQLITE_READONLY = 8

WRITE_ON_REPLICA = (
    "This statement writes, but it ran in a read-only transaction on a read replica (or on the "
    "primary standing in for one): writes belong on the primary. In `async with "
    "db(replica=True):` open `async with db():` for the write; in a request that replica_reads "
    "sends to a replica, ORM changes and insert/update/delete/text writes move the rest of the "
    "request to the primary by themselves, but a SELECT that writes (nextval(), a function) "
    "cannot be told apart: run it in `async with db(replica=False):`."
)


def reading(engine: AsyncEngine, role: str) -> Engine:
    """The engine (sharing ``engine``'s pool) whose transactions are read-only."""
    options: dict[str, Any] = {READ_ONLY: role}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True  # BEGIN READ ONLY, with no statement of its own
    return engine.sync_engine.execution_options(**options)


def refused_write(context: ExceptionContext) -> BaseException | None:
    """A write refused by a read-only transaction of ours becomes a ``ReplicaWriteError``."""
    connection = context.connection
    if connection is None or not connection.get_execution_options().get(READ_ONLY):
        return None
    if _is_read_only_refusal(context.original_exception):
        return ReplicaWriteError(WRITE_ON_REPLICA)
    return None


def _is_read_only_refusal(error: BaseException) -> bool:
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if code == _READ_ONLY_SQLSTATE:
        return True
    sqlite_code = getattr(error, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int) and sqlite_code & 0xFF == _SQLITE_READONLY:
        return True
    return bool(error.args) and error.args[0] == _MYSQL_READ_ONLY


def read_only_begun(connection: Connection) -> None:
    """Make the transaction just begun on ``connection`` read-only, where the driver cannot."""
    role = connection.get_execution_options().get(READ_ONLY)
    if role is None:
        return
    dialect = connection.dialect.name
    if dialect in ("mysql", "mariadb"):
        connection.exec_driver_sql("START TRANSACTION READ ONLY")
    elif dialect == "sqlite" and role == "replica":
        # SQLite has no read-only transactions; a replica's connections are read-only for good,
        # set once per connection.
        info = connection.connection.info
        if not info.get(READ_ONLY):
            connection.exec_driver_sql("PRAGMA query_only = ON")
            info[READ_ONLY] = True
