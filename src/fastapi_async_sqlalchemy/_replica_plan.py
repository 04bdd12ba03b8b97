"""The middleware's replica arguments, checked before anything is made."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine

from ._config import (
    DriverNotInstalledError,
    InvalidTypeError,
    InvalidURLError,
    SyncDriverError,
    check_seconds,
)
from ._replicas import Replica, ReplicaSet
from .exceptions import InvalidConfigurationError


def check_replica_reads(
    rule: object,
) -> Callable[[Mapping[str, Any]], bool] | None:
    """``replica_reads``: HTTP methods (``["GET", "HEAD"]``) or ``rule(scope) -> bool``."""
    if rule is None:
        return None
    if callable(rule):
        return rule
    message = (
        "replica_reads must be HTTP methods, such as ['GET', 'HEAD'], or a function taking the "
        f"ASGI scope and returning True for requests whose reads go to a replica, not {rule!r}."
    )
    if isinstance(rule, str) or not isinstance(rule, Iterable):
        raise InvalidTypeError(message)
    methods = []
    for method in rule:
        if not isinstance(method, str) or not method.isalpha():
            raise InvalidTypeError(message)
        methods.append(method.upper())
    chosen = frozenset(methods)
    return lambda scope: scope["method"] in chosen


class ReplicaPlan(NamedTuple):
    """The replica arguments, checked; :meth:`build` makes the set once the primary exists."""

    urls: list[URL]
    engines: list[AsyncEngine]
    max_lag: float | None
    check_interval: float
    wait: float
    reads: Callable[[Mapping[str, Any]], bool] | None

    def build(
        self,
        primary: AsyncEngine,
        create: Callable[[URL], AsyncEngine],
    ) -> ReplicaSet:
        for engine in self.engines:
            if engine is primary or engine.sync_engine.pool is primary.sync_engine.pool:
                raise InvalidConfigurationError(
                    "replica_engines must not hold the primary's own engine: give each replica "
                    "an engine of its own (its reads run read-only)."
                )
        replicas = [Replica(engine, owned=False) for engine in self.engines]
        replicas += [Replica(create(url), owned=True) for url in self.urls]
        return ReplicaSet(
            primary,
            replicas,
            max_lag=self.max_lag,
            check_interval=self.check_interval,
            wait=self.wait,
            reads=self.reads,
        )


def plan_replicas(
    primary_backend: str,
    urls: object,
    engines: object,
    check_url: Callable[[object], URL],
    *,
    max_lag: object,
    check_interval: object,
    wait: object,
    reads: object,
) -> ReplicaPlan | None:
    """The middleware's replica arguments, checked before anything is made; ``None`` without
    replicas."""
    url_list = [check_url(url) for url in _sequence("replica_urls", urls, "URLs of replicas")]
    engine_list = list(_sequence("replica_engines", engines, "AsyncEngines of replicas"))
    for engine in engine_list:
        if not isinstance(engine, AsyncEngine):
            raise InvalidTypeError(
                "replica_engines must hold AsyncEngines (from create_async_engine()), not "
                f"{type(engine).__name__}."
            )
    for url in url_list:
        _check_driver(url)
    rule = check_replica_reads(reads)
    lag = None if max_lag is None else check_seconds("replica_max_lag", max_lag, allow_zero=True)
    interval = check_seconds("replica_check_interval", check_interval)
    waited = check_seconds("replica_wait", wait, allow_zero=True)
    if not url_list and not engine_list:
        if rule is not None:
            raise InvalidConfigurationError(
                "replica_reads needs replicas to send reads to: pass replica_urls (or "
                "replica_engines) too."
            )
        return None
    backends = {url.get_backend_name() for url in url_list}
    backends |= {engine.dialect.name for engine in engine_list}
    for backend in backends - {primary_backend}:
        raise InvalidConfigurationError(
            f"Replicas must run the primary's database ({primary_backend}), not {backend}: a "
            "replica is a copy of the primary."
        )
    return ReplicaPlan(url_list, engine_list, lag, interval, waited, rule)


def _check_driver(url: URL) -> None:
    """A replica URL's dialect and driver, checked before any engine is made."""
    try:
        dialect = url.get_dialect()
    except ArgumentError:
        raise InvalidURLError(
            f"replica_urls names a dialect SQLAlchemy does not know ({url.drivername}): use an "
            "async driver, such as postgresql+asyncpg or mysql+asyncmy."
        ) from None
    if not getattr(dialect, "is_async", False):
        raise SyncDriverError(
            f"replica_urls names a synchronous driver ({url.drivername}): use an async one, "
            "such as postgresql+asyncpg, mysql+asyncmy or sqlite+aiosqlite."
        )
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise DriverNotInstalledError(
            f"replica_urls names a driver that is not installed ({error}): install it."
        ) from None


def _sequence(name: str, value: object, what: str) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, str | bytes | URL) or not isinstance(value, Iterable):
        raise InvalidTypeError(f"{name} must be a list of {what}, not {value!r}.")
    return list(value)
