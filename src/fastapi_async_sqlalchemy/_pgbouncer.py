"""What each PostgreSQL driver needs behind PgBouncer in transaction (or statement) pooling.

PgBouncer hands each transaction whichever server connection is free, so a prepared statement
made in one transaction is missing (or already there) in the next: asyncpg fails with
``prepared statement "__asyncpg_stmt_1__" does not exist``, psycopg with ``"_pg3_0" already
exists``. The preset turns prepared statements off (asyncpg ``statement_cache_size=0``, psycopg
``prepare_threshold=None``); the statements are still sent with their parameters apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL, make_url

from ._config import InvalidTypeError
from .exceptions import InvalidConfigurationError

_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "asyncpg": {"statement_cache_size": 0},
    "psycopg": {"prepare_threshold": None},
    "psycopg_async": {"prepare_threshold": None},
}


def pgbouncer_engine_args(
    url: str | URL, engine_args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``engine_args`` (``create_async_engine()`` keywords) with what the driver of ``url``
    needs behind PgBouncer in transaction pooling mode, for an engine you create yourself::

        engine = create_async_engine(url, **pgbouncer_engine_args(url))

    The middleware's ``pgbouncer=True`` applies it to the engines it creates. Your own
    ``connect_args`` are kept, and win where they set the same key.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "postgresql":
        raise InvalidConfigurationError(
            "pgbouncer=True is for PostgreSQL behind PgBouncer; this database is "
            f"{parsed.get_backend_name()}: leave pgbouncer off."
        )
    preset = _CONNECT_ARGS.get(parsed.get_driver_name())
    if preset is None:
        raise InvalidConfigurationError(
            f"pgbouncer=True knows the drivers asyncpg and psycopg, not "
            f"{parsed.get_driver_name()}: use postgresql+asyncpg or postgresql+psycopg."
        )
    args = dict(engine_args or {})
    connect_args = args.get("connect_args") or {}
    if not isinstance(connect_args, Mapping):
        raise InvalidTypeError(
            "engine_args['connect_args'] must be a dict of the driver's connect() keywords, "
            f"not {type(connect_args).__name__}."
        )
    args["connect_args"] = {**preset, **connect_args}
    return args
