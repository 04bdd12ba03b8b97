"""The engine a middleware creates from ``db_url``, and the checks of where its engine comes from.

SQLAlchemy's errors are turned into ours (each also the type 0.8 raised), on one line, naming
the argument; none of SQLAlchemy's messages holds the password.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._config import (
    DriverNotInstalledError,
    InvalidTypeError,
    InvalidURLError,
    SyncDriverError,
    check_url,
)
from .exceptions import InvalidConfigurationError


def check_engine_source(
    db_url: object, custom_engine: object, engine_args: Mapping[str, Any] | None
) -> URL | None:
    if db_url is None and custom_engine is None:
        raise InvalidConfigurationError(
            "SQLAlchemyMiddleware needs db_url (it then creates and owns the engine) or "
            "custom_engine (an AsyncEngine you own); neither was given."
        )
    if db_url is not None and custom_engine is not None:
        raise InvalidConfigurationError(
            "Give either db_url or custom_engine, not both: with custom_engine the middleware "
            "uses your engine and never creates one."
        )
    if custom_engine is not None:
        if not isinstance(custom_engine, AsyncEngine):
            raise InvalidConfigurationError(
                "custom_engine must be an AsyncEngine (from create_async_engine()), "
                f"not {type(custom_engine).__name__}."
            )
        return None  # engine_args, if any, only apply to an engine made from db_url
    if engine_args is not None and not isinstance(engine_args, Mapping):
        raise InvalidTypeError(
            "engine_args must be a dict of create_async_engine() keyword arguments, "
            f"not {type(engine_args).__name__}."
        )
    return check_url(db_url)


def create_engine(url: URL, engine_args: Mapping[str, Any] | None) -> AsyncEngine:
    # SQLAlchemy's messages name the argument or the driver; none of them holds the password.
    try:
        return create_async_engine(url, **(engine_args or {}))
    except (TypeError, ValueError, AttributeError) as exc:
        error = InvalidTypeError if isinstance(exc, TypeError) else InvalidConfigurationError
        raise error(
            f"engine_args: {_one_line(exc)} Pass only create_async_engine() keywords the "
            "dialect accepts, with values of the documented types."
        ) from None
    except ImportError as exc:
        raise DriverNotInstalledError(
            f"db_url names a driver that is not installed ({_one_line(exc)}): install it, or "
            "use an async driver that is, such as postgresql+asyncpg or sqlite+aiosqlite."
        ) from None
    except ArgumentError as exc:
        raise InvalidURLError(
            f"db_url names a dialect or driver that cannot be used here ({_one_line(exc)}): "
            "use an async driver, such as postgresql+asyncpg, mysql+asyncmy or sqlite+aiosqlite."
        ) from None
    except InvalidRequestError as exc:
        raise SyncDriverError(
            f"db_url names a dialect or driver that cannot be used here ({_one_line(exc)}): "
            "use an async driver, such as postgresql+asyncpg, mysql+asyncmy or sqlite+aiosqlite."
        ) from None


def _one_line(exc: BaseException) -> str:
    """SQLAlchemy's message on one line, as every error of ours is."""
    return " ".join(str(exc).split())
