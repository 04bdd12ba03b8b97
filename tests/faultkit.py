"""Tools for the fault-injection tests (tests/test_faults.py): not a test module itself.

- :data:`SEED` and :data:`REQUESTS` size a run; ``make stress`` raises them through
  ``FAULTS_SEED`` and ``FAULTS_REQUESTS``.
- :func:`call` drives an ASGI app in-process, one request, and can cancel it (a client that goes
  away) or send it ``http.disconnect``.
- :class:`TcpProxy` stands in front of a real database server and can go down (close every
  connection, refuse new ones) and come back: a database restart that touches nobody else.
- :class:`ServerConnections` sees, from the server's side, the connections one engine opened, and
  kills those (and only those) on request.
- :class:`Tally` counts what a run did and which invariants it broke; with ``FAULTS_REPORT`` set
  it appends its figures to that file, and ``python tests/faultkit.py FILE`` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from conftest import http_scope
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SEED = int(os.environ.get("FAULTS_SEED", "20240601"))
REQUESTS = int(os.environ.get("FAULTS_REQUESTS", "200"))
REPORT = os.environ.get("FAULTS_REPORT")

Message = dict[str, Any]


def rng(*names: str) -> random.Random:
    """A generator seeded by :data:`SEED` and the scenario, so each scenario has its own plan."""
    return random.Random("/".join((str(SEED), *names)))


# -- driving an app in-process ------------------------------------------------------------------


@dataclass
class Exchange:
    """What the client of one request saw, and how the app's call ended."""

    status: int | None = None  # from the http.response.start the server received
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the final body chunk arrived
    error: BaseException | None = None  # what the app raised (CancelledError: cancelled)
    elapsed: float = 0.0
    hung: bool = False  # it outlived its deadline and was cancelled by the driver

    @property
    def acknowledged(self) -> bool:
        """The client was told its request succeeded."""
        return self.status is not None and 200 <= self.status < 300


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    cancel_when: asyncio.Event | None = None,
    cancel_again: bool = False,
    disconnect_when: asyncio.Event | None = None,
    deadline: float = 10.0,
) -> Exchange:
    """Run one request through ``app`` as a server would, in a task of its own.

    ``cancel_when``: the request task is cancelled once that event is set (a client that went
    away, a server shutting down); with ``cancel_again`` it is cancelled again and again until it
    ends, so cancellations also land while it cleans up. ``disconnect_when``: ``receive()``
    answers ``http.disconnect`` once it is set. A request still running after ``deadline``
    seconds is cancelled and marked ``hung``.
    """
    exchange = Exchange()
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect_when is None:
            await asyncio.Event().wait()
        else:
            await disconnect_when.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            exchange.status = message["status"]
            exchange.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            exchange.body += message.get("body", b"")
            exchange.complete = not message.get("more_body", False)

    started = time.monotonic()
    task = asyncio.ensure_future(app(http_scope(method, path), receive, send))
    waiters: set[asyncio.Future[Any]] = {task}
    canceller = asyncio.ensure_future(cancel_when.wait()) if cancel_when is not None else None
    if canceller is not None:
        waiters.add(canceller)
    try:
        done, _ = await asyncio.wait(waiters, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            exchange.hung = canceller not in done
            task.cancel()
            while cancel_again and not exchange.hung and not task.done():
                await asyncio.sleep(0)
                task.cancel()
        try:
            await task
        except BaseException as exc:  # the app's own outcome, recorded for the checks
            exchange.error = exc
    finally:
        if canceller is not None:
            canceller.cancel()
        if not task.done():  # the driver itself was cancelled: leave nothing running
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    exchange.elapsed = time.monotonic() - started
    return exchange


# -- a database that goes away ------------------------------------------------------------------


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of ``host:port`` that can be taken down and back up.

    Down means what a restarting server looks like to its clients: every relayed connection is
    cut (both ends) and new connections are refused, since nothing listens on the port. Up listens
    on the same port again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers))

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(client)
        server: asyncio.StreamWriter | None = None
        try:
            if self._server is None:
                return
            server_reader, server = await asyncio.open_connection(*self.upstream)
            self._writers.add(server)
            await asyncio.gather(
                self._pipe(client_reader, server), self._pipe(server_reader, client)
            )
        except OSError:
            pass
        finally:
            for writer in (client, server):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            self._handlers.discard(handler)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()  # one side gone: the relayed connection is over


# -- the server's view of our connections -------------------------------------------------------


class ServerConnections:
    """The server-side connections of one engine, seen and killed from an admin connection.

    On PostgreSQL the engine's connections carry an ``application_name`` unique to this object;
    on MariaDB each connection's id is noted as it connects. Only those are ever counted or
    killed: the servers are shared.
    """

    def __init__(self, backend: str, url: str, tag: str) -> None:
        self.backend = backend  # "postgresql", "mariadb" or "sqlite"
        self.tag = f"faults-{os.getpid()}-{tag}"[:60]
        self.database = make_url(url).database
        self.ids: set[int] = set()
        self.admin: AsyncEngine | None = (
            create_async_engine(url, pool_size=2, max_overflow=8)
            if backend in ("postgresql", "mariadb")
            else None
        )

    @property
    def on_server(self) -> bool:
        return self.admin is not None

    def engine_args(self) -> dict[str, Any]:
        """``engine_args`` that make the engine's connections recognisable on the server."""
        if self.backend == "postgresql":
            return {"connect_args": {"server_settings": {"application_name": self.tag}}}
        return {}

    def track(self, engine: AsyncEngine) -> None:
        """Note the server id of every connection ``engine`` opens from now on."""
        if self.on_server:
            event.listen(engine.sync_engine, "connect", self._connected)

    def _connected(self, dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self._id_query)
            self.ids.add(int(cursor.fetchone()[0]))
        finally:
            cursor.close()

    @property
    def _id_query(self) -> str:
        return (
            "SELECT pg_backend_pid()" if self.backend == "postgresql" else "SELECT CONNECTION_ID()"
        )

    async def current_id(self, session: Any) -> int:
        """The server id of the connection ``session`` holds (checking one out if needed)."""
        return int((await session.execute(text(self._id_query))).scalar_one())

    async def live(self) -> int:
        """How many of our connections the server shows right now."""
        assert self.admin is not None
        async with self.admin.connect() as connection:
            if self.backend == "postgresql":
                query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :tag"
                return int((await connection.execute(text(query), {"tag": self.tag})).scalar_one())
            rows = await connection.execute(
                text("SELECT id FROM information_schema.processlist WHERE db = :db"),
                {"db": self.database},
            )
            return len({int(row[0]) for row in rows} & self.ids)

    async def settle(self, at_most: int, within: float = 5.0) -> int:
        """Wait (bounded) until the server shows at most ``at_most`` of ours; return the count.

        A server reaps a closed connection's backend a moment after the client closed it.
        """
        deadline = time.monotonic() + within
        while True:
            count = await self.live()
            if count <= at_most or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.05)

    async def kill(self, server_id: int) -> None:
        """Kill one of our connections on the server and wait until it is gone."""
        assert self.admin is not None
        async with self.admin.connect() as connection:
            if self.backend == "postgresql":
                query = (
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE pid = :pid AND application_name = :tag"
                )
                result = await connection.execute(text(query), {"pid": server_id, "tag": self.tag})
                assert result.scalar_one_or_none() is not False, "PostgreSQL refused the kill"
            else:
                assert server_id in self.ids, "refusing to kill a connection that is not ours"
                owner = await connection.execute(
                    text("SELECT db FROM information_schema.processlist WHERE id = :id"),
                    {"id": server_id},
                )
                if owner.scalar_one_or_none() != self.database:
                    return  # already gone
                await connection.execute(text(f"KILL CONNECTION {int(server_id)}"))
            await connection.commit()

    async def kill_all(self) -> None:
        """Kill every connection of ours the server still shows (after a leak: so that no lock
        they hold blocks the clean-up of the test's tables)."""
        if self.admin is None:
            return
        async with self.admin.connect() as connection:
            if self.backend == "postgresql":
                query = (
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE application_name = :tag"
                )
                await connection.execute(text(query), {"tag": self.tag})
            else:
                rows = await connection.execute(
                    text("SELECT id FROM information_schema.processlist WHERE db = :db"),
                    {"db": self.database},
                )
                for server_id in {int(row[0]) for row in rows} & self.ids:
                    await connection.execute(text(f"KILL CONNECTION {server_id}"))
            await connection.commit()

    async def dispose(self) -> None:
        if self.admin is not None:
            await self.admin.dispose()


# -- leaks that only show at garbage collection --------------------------------------------------

# SQLModel's AsyncSession deprecates .execute() in favour of .exec(): advice, not a fault (the same
# filter as pyproject.toml's).
_SQLMODEL_ADVICE = r"(?s).*You probably want to use .session.exec\(\)."


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning of the block, after a final ``gc.collect()``.

    SQLAlchemy's "garbage collector is trying to clean up" warning, emitted when a connection
    that was never returned is collected, is counted as a leak by the caller; any other warning
    fails the test as pyproject.toml's ``filterwarnings = error`` would.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=_SQLMODEL_ADVICE, category=DeprecationWarning)
        try:
            yield caught
        finally:
            gc.collect()


# How a cleanup failure reported beside the error that caused the cleanup begins.
CLEANUP_REPORTED = "A database session cleanup error was suppressed"


def is_gc_cleanup(warning: warnings.WarningMessage) -> bool:
    return "garbage collector is trying to clean up" in str(warning.message)


# -- figures ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """The figures of one run: requests, outcomes, faults injected per kind, violations."""

    scenario: str
    database: str
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    observed: Counter[str] = field(default_factory=Counter)  # e.g. connections invalidated
    violations: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def saw(self, exchange: Exchange) -> None:
        self.requests += 1
        if exchange.hung:
            self.statuses["hung"] += 1
        elif exchange.status is None:
            self.statuses["no response"] += 1
        else:
            self.statuses[f"{exchange.status // 100}xx"] += 1

    def violated(self, rule: str, detail: str) -> None:
        self.violations.append(f"{rule}: {detail}")

    def check_warnings(self, caught: list[warnings.WarningMessage]) -> list[str]:
        """Count leaked-connection warnings as violations; return the other warnings."""
        others = []
        for warning in caught:
            if is_gc_cleanup(warning):
                self.violated("no connection left to the garbage collector", str(warning.message))
            elif str(warning.message).startswith(CLEANUP_REPORTED):
                # A rollback on a killed connection failing while the work's own error
                # propagates: reported beside it, by design (the first error wins).
                self.observed["cleanup failure reported beside the error"] += 1
            else:
                others.append(f"{warning.category.__name__}: {warning.message}")
        return others

    def publish(self) -> None:
        """Append this run's figures to ``FAULTS_REPORT``, when that is set."""
        if not REPORT:
            return
        record = {
            "scenario": self.scenario,
            "database": self.database,
            "seed": SEED,
            "requests": self.requests,
            "statuses": dict(self.statuses),
            "faults": dict(self.faults),
            "observed": dict(self.observed),
            "violations": len(self.violations),
            "seconds": round(time.monotonic() - self.started, 2),
        }
        with open(REPORT, "a", encoding="utf-8") as report:
            report.write(json.dumps(record) + "\n")


def summarize(path: str) -> str:
    """The figures of a report file as a table, with totals.

    Runs named "bad input: ..." tried argument sets rather than requests: they are totalled apart.
    """
    if not os.path.exists(path):
        return f"no figures: {path} was not written"
    with open(path, encoding="utf-8") as report:
        records = [json.loads(line) for line in report if line.strip()]
    lines = [f"{'scenario':<28} {'database':<11} {'requests':>8} {'violations':>10}  faults"]
    totals: dict[bool, list[int]] = {False: [0, 0], True: [0, 0]}
    faults: Counter[str] = Counter()
    observed: Counter[str] = Counter()
    for record in records:
        drawn = ", ".join(f"{kind} {count}" for kind, count in sorted(record["faults"].items()))
        lines.append(
            f"{record['scenario']:<28} {record['database']:<11} {record['requests']:>8} "
            f"{record['violations']:>10}  {drawn}"
        )
        bad_input = record["scenario"].startswith("bad input")
        totals[bad_input][0] += record["requests"]
        totals[bad_input][1] += record["violations"]
        if not bad_input:
            faults.update(record["faults"])
            observed.update(record.get("observed", {}))
    requests, violations = totals[False]
    argument_sets, problems = totals[True]
    lines.append("")
    lines.append(f"requests: {requests}; invariant violations: {violations}")
    lines.append(f"faults injected: {sum(faults.values())}")
    lines.extend(f"  {kind}: {count}" for kind, count in sorted(faults.items()))
    lines.extend(f"observed, {kind}: {count}" for kind, count in sorted(observed.items()))
    if argument_sets:
        lines.append(f"bad input: {argument_sets} argument sets; kinds of problems: {problems}")
    seeds = ", ".join(sorted({str(record["seed"]) for record in records}))
    lines.append(f"seed: {seeds}; runs: {len(records)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
