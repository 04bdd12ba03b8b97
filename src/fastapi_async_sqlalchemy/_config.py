"""Argument checks and the session factory: everything decided once, at construction time."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from functools import cache
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.orm import Session

from .exceptions import InvalidConfigurationError


# Refusals that 0.8 raised as other types: each is also that type, so `except TypeError:` (or
# `ArgumentError`, `ImportError`) written against 0.8 still catches what it caught there.
class InvalidTypeError(InvalidConfigurationError, TypeError):
    """Raised for an argument of the wrong type (0.8 raised a ``TypeError``)."""


class InvalidURLError(InvalidConfigurationError, ArgumentError):
    """Raised for a ``db_url`` SQLAlchemy cannot parse or has no dialect for (0.8 raised
    ``sqlalchemy.exc.ArgumentError``)."""


class SyncDriverError(InvalidConfigurationError, InvalidRequestError):
    """Raised for a ``db_url`` naming a synchronous driver (0.8 raised SQLAlchemy's
    ``InvalidRequestError``)."""


class DriverNotInstalledError(InvalidConfigurationError, ModuleNotFoundError):
    """Raised for a ``db_url`` whose driver is not installed (0.8 raised the
    ``ModuleNotFoundError`` of its import)."""


@cache
def default_session_class() -> type[AsyncSession]:
    """SQLModel's ``AsyncSession`` (which adds ``.exec()``) when SQLModel is installed."""
    try:
        from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession
    except ImportError:
        return AsyncSession
    return SQLModelAsyncSession


_keywords_by_class: dict[type[AsyncSession], frozenset[str]] = {}


def _session_keywords(session_class: type[AsyncSession]) -> frozenset[str]:
    """Keywords that ``async_sessionmaker(class_=session_class, ...)`` can pass on."""
    known = _keywords_by_class.get(session_class)
    if known is not None:
        return known
    names = {"class_"}
    for init in (session_class.__init__, Session.__init__):
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                names.add(parameter.name)
    names.discard("self")
    known = _keywords_by_class[session_class] = frozenset(names)
    return known


def check_session_args(
    session_args: Mapping[str, Any] | None, *, allow_bind: bool = True
) -> dict[str, Any]:
    """Return ``session_args`` as a dict, refusing keywords no session class accepts.

    The middleware's own sessions are bound to its engine (``allow_bind=False``); a ``db(...)``
    block may bind its sessions elsewhere, e.g. to a connection of a test.
    """
    if session_args is None:
        return {}
    if not isinstance(session_args, Mapping):
        raise InvalidConfigurationError(
            f"session_args must be a dict of AsyncSession keyword arguments, "
            f"not {type(session_args).__name__}."
        )
    args = dict(session_args)
    session_class = args.get("class_", default_session_class())
    if not (isinstance(session_class, type) and issubclass(session_class, AsyncSession)):
        raise InvalidConfigurationError(
            "session_args['class_'] must be a subclass of sqlalchemy.ext.asyncio.AsyncSession."
        )
    if "bind" in args:
        if not allow_bind:
            raise InvalidConfigurationError(
                "session_args must not set 'bind': the middleware binds its sessions to its own "
                "engine; pass custom_engine to use another one."
            )
        if not isinstance(args["bind"], AsyncEngine | AsyncConnection):
            raise InvalidConfigurationError(
                "session_args['bind'] must be an AsyncEngine or AsyncConnection, "
                f"not {type(args['bind']).__name__}."
            )
    unknown = sorted(set(args) - _session_keywords(session_class))
    if unknown:
        raise InvalidConfigurationError(
            f"session_args has unknown keyword(s) {', '.join(map(repr, unknown))}: pass only "
            f"arguments that {session_class.__name__} accepts (e.g. 'expire_on_commit', "
            "'autoflush', 'class_')."
        )
    return args


def make_session_factory(
    bind: AsyncEngine | AsyncConnection, session_args: Mapping[str, Any]
) -> async_sessionmaker[AsyncSession]:
    """The factory for every session of one middleware: our defaults, then ``session_args``."""
    options: dict[str, Any] = {"class_": default_session_class(), "expire_on_commit": False}
    options.update(session_args)
    return async_sessionmaker(bind, **options)


def check_url(db_url: object) -> URL:
    """Parse ``db_url`` without ever echoing it: it may hold a password."""
    if isinstance(db_url, URL):
        return db_url
    if not isinstance(db_url, str):
        raise InvalidURLError(
            f"db_url must be a string or a sqlalchemy.URL, not {type(db_url).__name__}."
        )
    try:
        return make_url(db_url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise InvalidURLError(
            "db_url could not be parsed: give a SQLAlchemy URL such as "
            "'postgresql+asyncpg://user:password@host/dbname'."
        ) from None


def check_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """A finite number of seconds above zero, or from zero on with ``allow_zero``.

    The value is given back as it was passed (an ``int`` stays an ``int``), as 0.8 kept it.
    """
    least = "0 or more" if allow_zero else "greater than 0"
    message = f"{name} must be a finite number of seconds {least}, not {value!r}."
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTypeError(message)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InvalidConfigurationError(message)
    return value


def check_optional_seconds(name: str, value: object) -> float | None:
    """Like :func:`check_seconds`, with ``None`` for 'no deadline'."""
    return None if value is None else check_seconds(name, value)


def check_positive_int(name: str, value: object) -> int | None:
    """A whole number of at least 1 (bools refused), or ``None`` for 'no limit'."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigurationError(
            f"{name} must be a whole number of at least 1 (or None for no limit), not {value!r}."
        )
    return value


def check_attempts(value: object) -> int:
    """How many times ``run_in_transaction()`` may run its work: a whole number of at least 1."""
    attempts = check_positive_int("attempts", value)
    if attempts is None:
        raise InvalidTypeError("attempts must be a whole number of at least 1, not None.")
    return attempts
