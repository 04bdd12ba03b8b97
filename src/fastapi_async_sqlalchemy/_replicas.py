"""Read replicas: which ones there are, how healthy and how far behind each one is.

A :class:`ReplicaSet` is made by a middleware given ``replica_urls`` or ``replica_engines``. It
checks every replica in the background, on a connection of that replica's pool, every
``replica_check_interval`` seconds:

- PostgreSQL: ``pg_is_in_recovery()`` (a promoted replica is a replica no more), the replayed WAL
  position, and the lag in bytes (against the primary's position, read once a round) and in
  seconds (since the primary first passed the replica's position);
- MariaDB/MySQL: ``SHOW REPLICA STATUS`` (``Seconds_Behind_Master``; unknown, the replication
  stopped: lagging) and the applied GTID position; a server that replicates from nobody is
  taken as up to date;
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
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._positions import Position, WalPositions, parse_lsn, positions_for
from ._read_only import reading, refused_write
from ._tokens import UNREACHABLE

if TYPE_CHECKING:
    from ._router import Traffic

logger = logging.getLogger("fastapi_async_sqlalchemy.replicas")

_PG_CHECK = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END, "
    "CASE WHEN pg_is_in_recovery() AND pg_last_wal_receive_lsn() <> pg_last_wal_replay_lsn() "
    "THEN EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) ELSE 0 END"
)
_PG_PRIMARY_POSITION = "SELECT pg_current_wal_lsn()::text, current_setting('wal_block_size')"

HEALTHY, LAGGING, DOWN, PROMOTED, UNKNOWN = "healthy", "lagging", "down", "promoted", "unknown"


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
        self.position: Position | None = None  # replayed so far, where positions are known
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
        # How positions are read and compared (None: they are not, tokens mean "the primary").
        self.positions = positions_for(self.dialect)
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
        self._halt = asyncio.Event()  # set: the checks stop after the one under way
        self._stopping: asyncio.Task[None] | None = None  # told to stop, winding up
        # The engines read-only transactions run on (the primary's own connections get no
        # listener: an engine with one pays SQLAlchemy's event dispatch on every statement).
        # (The testing kit mirrors them onto the primary.)
        self.readers = [r.reader for r in replicas]
        if self.primary_reader is not primary.sync_engine:
            self.readers.append(self.primary_reader)

    # -- choosing ------------------------------------------------------------------------------

    def pick(self, position: Position | None) -> Replica | None:
        """A healthy replica (one replayed to ``position``, if given), in turn; no I/O."""
        candidates = [r for r in self.replicas if r.state == HEALTHY]
        if not candidates:
            return None
        if position is not None:
            positions = self.positions
            if positions is None or position == UNREACHABLE:
                return None  # no way to tell: the primary serves until the token expires
            candidates = [r for r in candidates if positions.reached(r.position, position)]
            if not candidates:
                return None
        return candidates[next(self._turn) % len(candidates)]

    async def catch_up(self, position: Position) -> Replica | None:
        """A healthy replica that replays up to ``position`` within ``wait`` seconds, or None."""
        candidates = [r for r in self.replicas if r.state == HEALTHY]
        positions = self.positions
        if not candidates or positions is None or position == UNREACHABLE:
            return None
        replica = candidates[next(self._turn) % len(candidates)]
        try:
            async with asyncio.timeout(self.wait * 2 + 1.0), replica.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                if await positions.wait(conn, position, self.wait):
                    return replica
                return None
        except Exception as error:  # any failure: the primary serves
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

    async def primary_position(self) -> Position | None:
        """The primary's position now, read after a commit (None: no positions here)."""
        if self.positions is None:
            return None
        async with self.primary.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return await self.positions.after_commit(conn)

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
        self._halt = asyncio.Event()
        self._task = loop.create_task(
            self._watch(self._halt),
            name="fastapi_async_sqlalchemy replicas",
            context=contextvars.Context(),
        )

    def pause(self) -> None:
        """Stop the checks until :meth:`resume`: the testing kit's block."""
        self.paused = True
        self._stop_watching()

    async def resume(self) -> None:
        """Checks again after :meth:`pause`, once the paused one has wound up."""
        await self._wind_up()
        self.paused = False
        self.start()

    def _stop_watching(self) -> None:
        """Tell the checks to stop once the one under way is done. They are not cancelled: a
        connection cut off while it is made or used may be left unclosed by its driver."""
        task, self._task = self._task, None
        if task is not None:
            self._halt.set()
            self._stopping = task

    async def _wind_up(self) -> None:
        task, self._stopping = self._stopping, None
        if task is not None:
            await task

    async def stop(self) -> None:
        """Stop the checks; dispose of the replica engines made from ``replica_urls``."""
        self.enabled = False
        self._stop_watching()
        await self._wind_up()
        for replica in self.replicas:
            replica.state = UNKNOWN
            if replica.owned:
                await replica.engine.dispose()

    async def _watch(self, halt: asyncio.Event) -> None:
        while not halt.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), self.check_interval)

    async def check(self) -> None:
        """Check every replica once (concurrently) and record what was found."""
        primary_at = await self._primary_now() if self.dialect == "postgresql" else None
        if primary_at is not None:
            self._samples.append((time.monotonic(), primary_at))
        await asyncio.gather(*(self._check(r, primary_at) for r in self.replicas))

    async def _primary_now(self) -> int | None:
        if self.paused:
            return None  # the testing kit watches the primary's engine: no connection of ours
        try:
            async with asyncio.timeout(self._timeout()):
                async with self.primary.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    position, block = (await conn.execute(text(_PG_PRIMARY_POSITION))).one()
                    if isinstance(self.positions, WalPositions):
                        self.positions.wal_block = int(block)
                    return parse_lsn(str(position))
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
            if self.positions is not None:
                replica.position = await self.positions.replayed(conn)
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
        for engine in self.readers:
            if not event.contains(engine, "handle_error", refused_write):
                event.listen(engine, "handle_error", refused_write)

    def detach(self) -> None:
        for engine in self.readers:
            if event.contains(engine, "handle_error", refused_write):
                event.remove(engine, "handle_error", refused_write)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def token_lifetime(replicas: ReplicaSet) -> float:
    """How long a read-your-writes token matters: past it, any replica in use has the write
    (its lag is at most ``replica_max_lag``, measured every check interval)."""
    lag = replicas.max_lag if replicas.max_lag is not None else 60.0
    return math.ceil(lag + 2 * replicas.check_interval + 1)
