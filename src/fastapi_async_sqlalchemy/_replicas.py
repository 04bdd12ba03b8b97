"""Read replicas: which ones there are, how healthy and how far behind each one is.

A :class:`ReplicaSet` is made by a middleware given ``replica_urls`` or ``replica_engines``. It
checks every replica in the background, on a connection of that replica's pool, every
``replica_check_interval`` seconds:

- PostgreSQL: ``pg_is_in_recovery()`` (a promoted replica is a replica no more), the replayed WAL
  position, and the lag in bytes (against the primary's position, read once a round) and in
  seconds (since the last replayed transaction, while anything is left to replay);
- MariaDB/MySQL: ``SHOW REPLICA STATUS`` (``Seconds_Behind_Master``); a server that replicates
  from nobody is taken as up to date;
- SQLite: reachable is healthy.

:meth:`ReplicaSet.pick` chooses among the healthy ones without any I/O. The primary serves the
reads when none is: a request never fails because a replica is down or behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._config import (
    DriverNotInstalledError,
    InvalidTypeError,
    InvalidURLError,
    SyncDriverError,
    check_seconds,
)
from .exceptions import InvalidConfigurationError, ReplicaWriteError

if TYPE_CHECKING:
    from ._routing import Traffic

logger = logging.getLogger("fastapi_async_sqlalchemy.replicas")

# Execution option of the engines that read: "replica", or "primary" for the primary's reads
# while no replica can serve them.
READ_ONLY = "fastapi_async_sqlalchemy.read_only"

# Why the database refused a write in a read-only transaction, per driver.
_READ_ONLY_SQLSTATE = "25006"
_MYSQL_READ_ONLY = 1792
_SQLITE_READONLY = 8

_PG_CHECK = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END, "
    "CASE WHEN pg_is_in_recovery() AND pg_last_wal_receive_lsn() <> pg_last_wal_replay_lsn() "
    "THEN EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) ELSE 0 END"
)
_PG_PRIMARY_POSITION = "SELECT pg_current_wal_lsn()::text, current_setting('wal_block_size')"
_PG_REPLAYED = "SELECT pg_last_wal_replay_lsn()::text"
_PG_INSERT_POSITION = "SELECT pg_current_wal_insert_lsn()::text"
_SHORT_PAGE_HEADER = 24  # the size of a WAL page's header (but a segment's first page)

HEALTHY, LAGGING, DOWN, PROMOTED, UNKNOWN = "healthy", "lagging", "down", "promoted", "unknown"

WRITE_ON_REPLICA = (
    "This statement writes, but it ran in a read-only transaction on a read replica (or on the "
    "primary standing in for one): writes belong on the primary. In `async with "
    "db(replica=True):` open `async with db():` for the write; in a request that replica_reads "
    "sends to a replica, ORM changes and insert/update/delete/text writes move the rest of the "
    "request to the primary by themselves, but a SELECT that writes (nextval(), a function) "
    "cannot be told apart: run it in `async with db(replica=False):`."
)


def parse_lsn(text: str | None) -> int | None:
    """A PostgreSQL WAL position (``'16/B374D848'``) as a number."""
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def replayable(position: int, wal_block: int | None) -> int:
    """The replay position that covers a WAL insert position.

    When the last record ended at a page boundary, the insert position points past the next
    page's header, where no replay position will be until another record is written. No record
    ends inside a page header, so the boundary itself is as safe. (A segment's first page has a
    longer header, whose size depends on the segment size: those positions are kept as they
    are, which is safe too.)
    """
    if wal_block and position % wal_block == _SHORT_PAGE_HEADER:
        return position - _SHORT_PAGE_HEADER
    return position


class Replica:
    """One replica: its engines and what the last check found."""

    __slots__ = (
        "checked_at",
        "engine",
        "error",
        "lag_bytes",
        "lag_seconds",
        "name",
        "owned",
        "position",
        "reader",
        "state",
    )

    def __init__(self, engine: AsyncEngine, owned: bool) -> None:
        self.engine = engine
        self.owned = owned
        # Transactions read-only: "replica" on the engines the middleware made, "borrowed" on
        # yours (whose connections keep no setting of ours).
        self.reader = reading(engine, "replica" if owned else "borrowed")
        self.name = describe(engine.url)
        self.state = UNKNOWN
        self.lag_seconds: float | None = None
        self.lag_bytes: int | None = None
        self.position: int | None = None  # PostgreSQL: the WAL position replayed so far
        self.checked_at: float | None = None
        self.error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "lag_seconds": self.lag_seconds,
            "lag_bytes": self.lag_bytes,
            "checked_at": self.checked_at,
            "error": self.error,
        }


def reading(engine: AsyncEngine, role: str) -> Engine:
    """The engine (sharing ``engine``'s pool) whose transactions are read-only."""
    options: dict[str, Any] = {READ_ONLY: role}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True  # BEGIN READ ONLY, with no statement of its own
    return engine.sync_engine.execution_options(**options)


def describe(url: URL) -> str:
    """A replica's name in status and logs: where it is, never its password."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite:{url.database or ':memory:'}"
    port = f":{url.port}" if url.port else ""
    return f"{url.host or 'localhost'}{port}/{url.database or ''}"


class ReplicaSet:
    """The replicas of one middleware's primary, their health, and the request routing state."""

    def __init__(
        self,
        primary: AsyncEngine,
        replicas: list[Replica],
        *,
        max_lag: float | None,
        check_interval: float,
        wait: float,
        reads: Callable[[Mapping[str, Any]], bool] | None,
    ) -> None:
        self.primary = primary
        self.replicas = replicas
        self.dialect = primary.dialect.name
        self.positioned = self.dialect == "postgresql"  # positions can be compared
        self.primary_reader = (
            primary.sync_engine if self.dialect == "sqlite" else reading(primary, "primary")
        )
        self.max_lag = max_lag
        self.check_interval = check_interval
        self.wait = wait
        self.reads = reads
        # The routing state of the current request (_routing.Traffic).
        self.traffic: ContextVar[Traffic | None] = ContextVar(
            "fastapi_async_sqlalchemy.traffic", default=None
        )
        self._turn = itertools.count()
        # The primary's position at each check (monotonic time, position): how long a replica
        # has been behind is how long ago the primary first passed where the replica is.
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        self._task: asyncio.Task[None] | None = None
        self.enabled = False  # between attach() and stop(): checks may run
        self.paused = False
        self._cancelled: asyncio.Task[None] | None = None  # paused, winding up
        self.wal_block: int | None = None  # PostgreSQL's WAL page size, read by the checks
        # The engines read-only transactions run on (the primary's own connections get no
        # listener: an engine with one pays SQLAlchemy's event dispatch on every statement).
        self._readers = [r.reader for r in replicas]
        if self.primary_reader is not primary.sync_engine:
            self._readers.append(self.primary_reader)

    # -- choosing ------------------------------------------------------------------------------

    def pick(self, position: int | None) -> Replica | None:
        """A healthy replica (one replayed to ``position``, if given), in turn; no I/O."""
        candidates = [r for r in self.replicas if r.state == HEALTHY]
        if not candidates:
            return None
        if position is not None:
            if not self.positioned:
                return None  # no way to tell: the primary serves until the token expires
            candidates = [r for r in candidates if (r.position or 0) >= position]
            if not candidates:
                return None
        return candidates[next(self._turn) % len(candidates)]

    async def catch_up(self, position: int) -> Replica | None:
        """A healthy replica that replays up to ``position`` within ``wait`` seconds, or None."""
        candidates = [r for r in self.replicas if r.state == HEALTHY]
        if not candidates or not self.positioned:
            return None
        replica = candidates[next(self._turn) % len(candidates)]
        deadline = time.monotonic() + self.wait
        try:
            async with asyncio.timeout(self.wait * 2 + 1.0), replica.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                while True:
                    replayed = parse_lsn(await conn.scalar(text(_PG_REPLAYED)))
                    if replayed is not None and replayed >= position:
                        replica.position = max(replica.position or 0, replayed)
                        return replica
                    if time.monotonic() >= deadline:
                        return None
                    await asyncio.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
        except (OSError, TimeoutError, Exception) as error:  # any failure: primary
            self.mark_down(replica, error)
            return None

    def mark_down(self, replica: Replica, error: BaseException) -> None:
        """The replica failed a request: skip it until a check finds it healthy again."""
        if replica.state != DOWN:
            logger.warning(
                "Read replica %s is unreachable (%s): its reads go to the primary until it is "
                "healthy again.",
                replica.name,
                _one_line(error),
            )
        replica.state, replica.error = DOWN, _one_line(error)

    def replica_of(self, engine: Engine) -> Replica | None:
        for replica in self.replicas:
            if replica.reader is engine:
                return replica
        return None

    async def primary_position(self) -> int | None:
        """The primary's WAL insert position now (PostgreSQL), read after a commit."""
        if not self.positioned:
            return None
        async with self.primary.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            position = parse_lsn(await conn.scalar(text(_PG_INSERT_POSITION)))
        return None if position is None else replayable(position, self.wal_block)

    def status(self) -> list[dict[str, Any]]:
        return [replica.status() for replica in self.replicas]

    # -- checking ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background checks, once an event loop runs (again, after a stop)."""
        if not self.enabled or self.paused or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the first request starts them
        # In a context of its own: nothing of the request or test that started it.
        self._task = loop.create_task(
            self._watch(), name="fastapi_async_sqlalchemy replicas", context=contextvars.Context()
        )

    def pause(self) -> None:
        """Stop the checks until :meth:`resume`: the testing kit's block."""
        self.paused = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            self._cancelled = task

    async def resume(self) -> None:
        """Checks again after :meth:`pause`, once the paused one has wound up."""
        await self._wind_up()
        self.paused = False
        self.start()

    async def _wind_up(self) -> None:
        task, self._cancelled = self._cancelled, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self) -> None:
        """Stop the checks; dispose of the replica engines made from ``replica_urls``."""
        self.enabled = False
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._wind_up()
        for replica in self.replicas:
            replica.state = UNKNOWN
            if replica.owned:
                await replica.engine.dispose()

    async def _watch(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.check_interval)

    async def check(self) -> None:
        """Check every replica once (concurrently) and record what was found."""
        primary_at = await self._primary_now() if self.positioned else None
        if primary_at is not None:
            self._samples.append((time.monotonic(), primary_at))
        await asyncio.gather(*(self._check(r, primary_at) for r in self.replicas))

    async def _primary_now(self) -> int | None:
        try:
            async with asyncio.timeout(self._timeout()):
                async with self.primary.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    position, block = (await conn.execute(text(_PG_PRIMARY_POSITION))).one()
                    self.wal_block = int(block)
                    return parse_lsn(position)
        except Exception:  # the primary's own trouble is the requests' to report
            return None

    def _timeout(self) -> float:
        return max(self.check_interval, 1.0)

    async def _check(self, replica: Replica, primary_at: int | None) -> None:
        try:
            async with asyncio.timeout(self._timeout()):
                async with replica.engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    state = await self._measure(replica, conn, primary_at)
        except Exception as error:  # whatever it is, the replica is not usable
            replica.lag_seconds = replica.lag_bytes = None
            was = replica.state
            replica.state, replica.error = DOWN, _one_line(error)
            if was != DOWN:
                logger.warning(
                    "Read replica %s failed its health check (%s): its reads go to the "
                    "primary until it is healthy again.",
                    replica.name,
                    replica.error,
                )
        else:
            if state != replica.state and replica.state not in (UNKNOWN,):
                logger.warning("Read replica %s is now %s.", replica.name, state)
            replica.state, replica.error = state, None
        replica.checked_at = time.time()

    async def _measure(
        self, replica: Replica, conn: AsyncConnection, primary_at: int | None
    ) -> str:
        if self.dialect == "postgresql":
            row = (await conn.execute(text(_PG_CHECK))).one()
            in_recovery, replayed, since = row
            if not in_recovery:
                replica.lag_seconds = replica.lag_bytes = None
                return PROMOTED
            replica.position = parse_lsn(replayed)
            behind = None
            if primary_at is not None and replica.position is not None:
                behind = max(0, primary_at - replica.position)
            replica.lag_bytes = behind
            if behind is None:
                # The primary's position is unknown: time since the last replayed transaction,
                # while received WAL waits to be replayed.
                replica.lag_seconds = float(since or 0.0)
            else:
                replica.lag_seconds = self._behind_since(replica.position) if behind else 0.0
        elif self.dialect in ("mysql", "mariadb"):
            try:
                status = (await conn.execute(text("SHOW REPLICA STATUS"))).mappings().first()
            except Exception:  # not allowed to see it: up, lag unknown
                replica.lag_seconds = None
                return HEALTHY
            if status is None:
                replica.lag_seconds = 0.0  # replicates from nobody: as up to date as it gets
            else:
                seconds = status.get("Seconds_Behind_Master")
                replica.lag_seconds = None if seconds is None else float(seconds)
                if seconds is None:
                    return LAGGING  # replication stopped: how stale it is, nobody knows
        else:
            await conn.scalar(text("SELECT 1"))
            replica.lag_seconds = 0.0
        lag = replica.lag_seconds
        if self.max_lag is not None and lag is not None and lag > self.max_lag:
            return LAGGING
        return HEALTHY

    def _behind_since(self, position: int | None) -> float:
        """Seconds since the first check that saw the primary past ``position``."""
        now = time.monotonic()
        for seen, primary_at in self._samples:
            if position is None or primary_at > position:
                return now - seen
        return 0.0

    # -- listeners -----------------------------------------------------------------------------

    def attach(self) -> None:
        self.enabled = True
        for engine in self._readers:
            if not event.contains(engine, "handle_error", _refused_write):
                event.listen(engine, "handle_error", _refused_write)

    def detach(self) -> None:
        for engine in self._readers:
            if event.contains(engine, "handle_error", _refused_write):
                event.remove(engine, "handle_error", _refused_write)


def _refused_write(context: ExceptionContext) -> BaseException | None:
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


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"


# -- construction ------------------------------------------------------------------------------


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


def token_lifetime(replicas: ReplicaSet) -> float:
    """How long a read-your-writes token matters: past it, any replica in use has the write
    (its lag is at most ``replica_max_lag``, measured every check interval)."""
    lag = replicas.max_lag if replicas.max_lag is not None else 60.0
    return math.ceil(lag + 2 * replicas.check_interval + 1)
