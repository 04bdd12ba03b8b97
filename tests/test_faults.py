"""Fault injection on real databases: nothing acknowledged is lost, nothing else is kept, no leaks.

Each scenario drives many requests through the real middleware at once and injects faults:
handler exceptions, handled 4xx, clients that go away (cancellation), commits that fail at commit
time, server-side connections killed mid-transaction, a database restart, pool exhaustion,
streaming bodies and background tasks cut short. After every run it checks the invariants:

- a request's row exists if and only if the client got a 2xx (for streams and background tasks:
  if and only if their work was acknowledged), so nothing acknowledged is lost and nothing
  unacknowledged is kept;
- the pool ends with nothing checked out, and the server shows no connection of ours beyond the
  pool size (none at all once the app has shut down);
- no connection was left to the garbage collector (SQLAlchemy's "garbage collector is trying to
  clean up" warning), and no request outlived its deadline.

The plans are seeded (``FAULTS_SEED``) and sized by ``FAULTS_REQUESTS``; ``make stress`` runs the
same tests longer and prints the figures each run reports (see ``faultkit.Tally``). The servers
are shared: only connections this module opened are ever killed, and a database "restart" is a
TCP proxy in front of the server going down, never the server itself.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import math
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from conftest import Database, bound, new_item, unused_app
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from faultkit import (
    REQUESTS,
    SEED,
    Exchange,
    ServerConnections,
    Tally,
    TcpProxy,
    call,
    recorded_warnings,
    rng,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as SQLAlchemyPoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

import fastapi_async_sqlalchemy._engine
import fastapi_async_sqlalchemy._middleware
from fastapi_async_sqlalchemy import (
    FastAPIAsyncSQLAlchemyError,
    PoolTimeoutError,
    SessionFinalizedError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

IN_FLIGHT = 12  # requests in flight at once in the traffic scenarios
DEADLINE = 10.0  # no request of a run may take longer: past it, it counts as hung
POOL_WAIT = 5  # pool_timeout of the services: a leaked connection shows up as errors, not hangs


class InjectedError(Exception):
    """The exception a handler raises on purpose."""


async def forever() -> None:
    """Park here until cancelled."""
    await asyncio.Event().wait()


class Logs(logging.Handler):
    """Every log record emitted while it is attached, formatted."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


# -- a service under test -----------------------------------------------------------------------


class Service:
    """A FastAPI app behind a fresh middleware, with the server's view of its connections.

    ``run()`` starts the app's lifespan, and when the block ends checks the invariants every run
    shares into ``tally``: the committed rows are exactly ``expected`` (the acknowledged ones),
    nothing is checked out, the server shows at most ``pool_size`` of our connections (none after
    shutdown), and no connection reached the garbage collector.
    """

    def __init__(
        self,
        database: Database,
        scenario: str,
        *,
        url: str | None = None,
        pool_size: int = 4,
        max_overflow: int = 4,
        engine_args: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.database = database
        self.pool_size = pool_size
        self.capacity = pool_size + max_overflow
        self.tally = Tally(scenario, database.name)
        self.server = ServerConnections(database.name, database.url, scenario)
        Middleware, self.db = create_middleware_and_session_proxy()
        args: dict[str, Any] = {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": POOL_WAIT,
        }
        for name, value in (*self.server.engine_args().items(), *(engine_args or {}).items()):
            if isinstance(value, dict):
                args[name] = {**args.get(name, {}), **value}
            else:
                args[name] = value
        self.app = FastAPI()
        self.app.add_middleware(
            Middleware, db_url=url or database.url, engine_args=args, commit_on_exit=True, **options
        )
        self.expected: set[str] = set()  # rows that must exist: acknowledged work
        self.allowed: set[str] = set()  # rows that may exist either way (documented as such)
        self.commit_failure = CommitFailure(database)
        self._loop_handler: Any = None

    @property
    def on_server(self) -> bool:
        return self.server.on_server

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        await self.commit_failure.install()
        leaked = False
        pool_errors = Logs(logging.ERROR)
        pool_logger = logging.getLogger("sqlalchemy.pool")
        pool_logger.addHandler(pool_errors)
        loop = asyncio.get_running_loop()
        self._loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        try:
            with recorded_warnings() as caught:
                async with LifespanManager(self.app):
                    self.server.track(self.db.engine)
                    event.listen(self.db.engine.sync_engine, "invalidate", self._invalidated)
                    watch = asyncio.ensure_future(self._watch_server())
                    try:
                        yield
                    finally:
                        watch.cancel()
                        await asyncio.wait([watch])
                    leaked = await self._check_pool()
                if self.on_server:
                    left = await self.server.settle(0)
                    if left:
                        leaked = True
                        self.tally.violated("no connection after shutdown", f"{left} still open")
                if leaked:  # their locks would block the clean-up below
                    await self.server.kill_all()
            others = self.tally.check_warnings(caught)
            await self._check_rows()
        finally:
            gc.collect()  # unretrieved futures are reported when collected: here, not later
            loop.set_exception_handler(self._loop_handler)
            pool_logger.removeHandler(pool_errors)
            await self.commit_failure.remove()
            await self.server.dispose()
        for record in pool_errors.records:
            self._pool_error(record)
        locked = self.tally.observed[SQLITE_LOCKED]
        if locked > max(3, self.tally.requests // 20):
            # A few are SQLite's nature; many mean a write lock that was never let go.
            self.tally.violated("SQLite writers are not starved", f"{locked} gave up waiting")
        self.tally.publish()
        assert not others, f"unexpected warnings: {others}"
        assert not self.tally.violations, "\n".join(self.tally.violations[:30])

    def _pool_error(self, record: logging.LogRecord) -> None:
        """SQLAlchemy's pool logs an ERROR when returning or closing a connection fails.

        One caused by a cancellation means the cancellation cut the return of a connection short
        (SPEC section 5: cancellation never skips rollback and close); others are counted.
        """
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage().split(" <")[0]
        if isinstance(error, asyncio.CancelledError):
            self.tally.violated("cancellation never cuts cleanup short", message)
        else:
            self.tally.observed[f"pool error: {message}"] += 1

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncpg leaves a future unretrieved when a connect is cancelled during its TLS probe
        (a client going away while its request connects): the driver's noise, counted; anything
        else reaches the test runner as usual."""
        error = context.get("exception")
        if isinstance(error, ConnectionError) and str(error) == ASYNCPG_CANCELLED_CONNECT:
            self.tally.observed["connect cancelled (asyncpg noise)"] += 1
        elif self._loop_handler is not None:
            self._loop_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def _watch_server(self) -> None:
        """While the run goes on, the server never shows more of ours than the pool holds.

        A connection that was just closed may linger on the server for a moment, so a count above
        capacity is only a violation if it does not settle within a second.
        """
        while self.on_server:
            if await self.server.live() > self.capacity:
                live = await self.server.settle(self.capacity, within=1.0)
                if live > self.capacity:
                    self.tally.violated(
                        "no server connection beyond the pool", f"{live} > {self.capacity}"
                    )
            await asyncio.sleep(0.05)

    def _invalidated(self, *args: Any) -> None:
        self.tally.observed["connections invalidated"] += 1

    async def _check_pool(self) -> bool:
        """Whether something is still checked out or open on the server beyond the pool."""
        leaked = False
        checked_out = self.db.engine.pool.checkedout()
        if checked_out:
            leaked = True
            self.tally.violated("nothing checked out at the end", f"{checked_out} checked out")
        if self.on_server:
            live = await self.server.settle(self.pool_size)
            if live > self.pool_size:
                leaked = True
                self.tally.violated(
                    "no server connection beyond the pool size", f"{live} > {self.pool_size}"
                )
        return leaked

    async def _check_rows(self) -> None:
        rows = set(await self.database.names()) - {TAKEN}
        for name in sorted(self.expected - rows):
            self.tally.violated("nothing acknowledged is lost", f"row {name} is missing")
        for name in sorted(rows - self.expected - self.allowed):
            self.tally.violated("nothing unacknowledged is kept", f"row {name} was kept")

    async def kill_connection_of(self, session: AsyncSession) -> None:
        """Kill, on the server, the connection ``session`` holds: mid-transaction."""
        await self.server.kill(await self.server.current_id(session))
        self.tally.faults["connection killed"] += 1

    def expect(self, outcome: str, exchange: Exchange, wanted: Callable[[Exchange], bool]) -> None:
        """Note a request whose outcome is not what its injected fault must lead to."""
        if self.database.name == "sqlite" and "database is locked" in str(exchange.error):
            # SQLite runs one writer at a time; under this much concurrency a write can wait
            # past its busy timeout and fail. A 5xx that keeps nothing: counted, not a fault.
            self.tally.observed[SQLITE_LOCKED] += 1
        elif exchange.hung:
            self.tally.violated("no request hangs", f"{outcome} still running after its deadline")
        elif not wanted(exchange):
            self.tally.violated(
                "each fault ends as it must",
                f"{outcome}: status {exchange.status}, error {exchange.error!r}",
            )


ASYNCPG_CANCELLED_CONNECT = "unexpected connection_lost() call"
SQLITE_LOCKED = "SQLite writer gave up waiting (database is locked)"

TAKEN = "taken"  # a row that exists before each run, so that duplicates of it fail


class CommitFailure:
    """Makes a session's commit fail at commit time, after the handler's work succeeded.

    PostgreSQL: an insert into a table with a deferred unique constraint succeeds, and the
    constraint fails at COMMIT. MariaDB and SQLite have no deferred constraints: there a
    ``before_commit`` hook inserts a duplicate of an existing row, which fails inside commit().
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.deferred = database.name == "postgresql"

    async def install(self) -> None:
        await self.database.insert(TAKEN)
        if self.deferred:
            async with self.database.check.begin() as connection:
                await connection.execute(text("DROP TABLE IF EXISTS fault_marks"))
                await connection.execute(
                    text(
                        "CREATE TABLE fault_marks (mark VARCHAR(20) "
                        "UNIQUE DEFERRABLE INITIALLY DEFERRED)"
                    )
                )
                await connection.execute(text(f"INSERT INTO fault_marks VALUES ('{TAKEN}')"))

    async def arm(self, session: AsyncSession) -> None:
        if self.deferred:
            await session.execute(text(f"INSERT INTO fault_marks VALUES ('{TAKEN}')"))
        else:

            @event.listens_for(session.sync_session, "before_commit")
            def insert_duplicate(sync_session: Session) -> None:
                sync_session.execute(new_item(TAKEN))

    async def remove(self) -> None:
        if self.deferred:
            async with self.database.check.begin() as connection:
                await connection.execute(text("DROP TABLE IF EXISTS fault_marks"))


async def drive(
    requests: Iterable[Callable[[], Any]], in_flight: int = IN_FLIGHT
) -> list[Exchange]:
    """Run the requests, at most ``in_flight`` at once; what each client saw, in order.

    The whole run has a budget that grows with its size: requests still running past it (a leak
    exhausting the pool, a deadlock) are cancelled and come back marked ``hung``, so a broken
    library fails the run in seconds instead of stalling it.
    """
    gate = asyncio.Semaphore(in_flight)

    async def one(request: Callable[[], Any]) -> Exchange:
        async with gate:
            return await request()  # type: ignore[no-any-return]

    tasks = [asyncio.ensure_future(one(request)) for request in requests]
    _, pending = await asyncio.wait(tasks, timeout=DEADLINE + 0.1 * len(tasks))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    return [Exchange(hung=True) if task.cancelled() else task.result() for task in tasks]


def is_2xx(exchange: Exchange) -> bool:
    return exchange.acknowledged


def failed_with(
    status: int, error: type[BaseException] | None = None
) -> Callable[[Exchange], bool]:
    def wanted(exchange: Exchange) -> bool:
        return exchange.status == status and (error is None or isinstance(exchange.error, error))

    return wanted


def cancelled_unanswered(exchange: Exchange) -> bool:
    """A request cancelled before it answered: the server received nothing at all."""
    return exchange.status is None and isinstance(exchange.error, asyncio.CancelledError)


# -- mixed traffic ------------------------------------------------------------------------------

SERVER_FAULTS = ("connection killed",)
MIXED_FAULTS = {
    "none": 6,
    "handler raised": 2,
    "handled 4xx": 2,
    "client went away": 2,
    "client went away mid-query": 1,
    "commit failed": 2,
    "connection killed": 2,
}


@dataclass
class Planned:
    """One request of a plan: the fault it meets, and a detail drawn for it."""

    fault: str
    detail: Any = None
    reached: asyncio.Event = field(default_factory=asyncio.Event)


def draw(random: Any, weights: dict[str, int], on_server: bool) -> str:
    kinds = [kind for kind in weights if on_server or kind not in SERVER_FAULTS]
    return str(random.choices(kinds, [weights[kind] for kind in kinds])[0])


async def test_mixed_traffic_keeps_exactly_the_acknowledged_rows(database: Database) -> None:
    """Under mixed faults, a request's row exists if and only if its client got a 2xx."""
    service = Service(database, "mixed traffic")
    db = service.db
    random = rng("mixed", database.name)
    plan = []
    for _ in range(REQUESTS):
        fault = draw(random, MIXED_FAULTS, service.on_server)
        detail = {
            "handled 4xx": random.choice([400, 404, 409, 422]),
            "connection killed": random.choice(["at commit", "at the next statement"]),
            # A server shutting down may cancel again while the rollback runs.
            "client went away": random.choice(["once", "again during cleanup"]),
            "client went away mid-query": random.choice(["once", "again during cleanup"]),
        }.get(fault)
        plan.append(Planned(fault, detail))

    @service.app.post("/requests/{rid}")
    async def handle(rid: int) -> dict[str, int]:
        planned = plan[rid]
        if planned.fault == "client went away mid-query":
            planned.reached.set()  # the client goes away while this INSERT is under way
        await db.session.execute(new_item(f"r{rid}"))
        if planned.fault == "handler raised":
            raise InjectedError(rid)
        if planned.fault == "handled 4xx":
            raise HTTPException(status_code=planned.detail)
        if planned.fault == "client went away":
            planned.reached.set()
            await forever()
        if planned.fault == "commit failed":
            await service.commit_failure.arm(db.session)
        if planned.fault == "connection killed":
            await service.kill_connection_of(db.session)
            if planned.detail == "at the next statement":
                await db.session.execute(text("SELECT 1"))
        return {"id": rid}

    def request(rid: int) -> Callable[[], Any]:
        planned = plan[rid]
        goes_away = planned.fault.startswith("client went away")
        return lambda: call(
            service.app,
            "POST",
            f"/requests/{rid}",
            cancel_when=planned.reached if goes_away else None,
            cancel_again=planned.detail == "again during cleanup",
            deadline=DEADLINE,
        )

    outcomes: dict[str, Callable[[Any], bool]] = {
        "none": is_2xx,
        "handler raised": failed_with(500, InjectedError),
        "client went away": cancelled_unanswered,
        "client went away mid-query": cancelled_unanswered,
        "commit failed": failed_with(500, IntegrityError),
        "connection killed": failed_with(500, DBAPIError),
    }
    async with service.run():
        exchanges = await drive(request(rid) for rid in range(len(plan)))
        for rid, (planned, exchange) in enumerate(zip(plan, exchanges, strict=True)):
            service.tally.saw(exchange)
            if planned.fault not in ("none", "connection killed"):  # kills count themselves
                service.tally.faults[planned.fault] += 1
            if planned.detail == "again during cleanup":
                service.tally.faults["cancelled again during cleanup"] += 1
            wanted = outcomes.get(planned.fault, failed_with(planned.detail))
            service.expect(f"request {rid} ({planned.fault})", exchange, wanted)
            if exchange.acknowledged:
                service.expected.add(f"r{rid}")


# -- multi-session children ---------------------------------------------------------------------

CHILD_FATES = {
    "none": 5,
    "raised before writing": 1,
    "raised after writing": 2,
    "commit failed": 2,
    "connection killed": 1,
}
REQUEST_FATES = {"none": 5, "handler raised after gather": 1, "client went away": 2}


@dataclass
class Family:
    """A request that runs children through db.gather(): its fate and each child's."""

    fate: str
    children: list[str]
    reached: asyncio.Event = field(default_factory=asyncio.Event)


async def test_gathered_children_keep_exactly_their_acknowledged_rows(database: Database) -> None:
    """Children failing at random keep no row; a 2xx lists exactly the children whose rows exist."""
    service = Service(database, "multi-session children", pool_size=5, max_overflow=10)
    db = service.db
    random = rng("multi", database.name)
    families = []
    for _ in range(max(1, REQUESTS // 2)):
        fate = draw(random, REQUEST_FATES, service.on_server)
        children = [
            draw(random, CHILD_FATES, service.on_server) for _ in range(random.randint(1, 5))
        ]
        if fate == "client went away":
            children[random.randrange(len(children))] = "parked"
        families.append(Family(fate, children))
    finished: set[str] = set()  # children whose work returned: only these may have a row

    async def child(rid: int, number: int, fate: str) -> None:
        if fate == "raised before writing":
            raise InjectedError(rid, number)
        name = f"r{rid}c{number}"
        await db.session.execute(new_item(name))
        if fate == "raised after writing":
            raise InjectedError(rid, number)
        if fate == "commit failed":
            await service.commit_failure.arm(db.session)
        if fate == "connection killed":
            await service.kill_connection_of(db.session)
        if fate == "parked":
            families[rid].reached.set()
            await forever()
        finished.add(name)

    @service.app.post("/families/{rid}")
    async def handle(rid: int) -> dict[str, list[int]]:
        family = families[rid]
        async with db(multi_sessions=True, commit_on_exit=True, max_concurrent=3, pool_timeout=10):
            results = await db.gather(
                *(child(rid, number, fate) for number, fate in enumerate(family.children)),
                return_exceptions=True,
            )
        if family.fate == "handler raised after gather":
            raise InjectedError(rid)
        await db.session.execute(new_item(f"r{rid}"))
        return {"ok": [n for n, result in enumerate(results) if not isinstance(result, Exception)]}

    def request(rid: int) -> Callable[[], Any]:
        family = families[rid]
        cancel_when = family.reached if family.fate == "client went away" else None
        return lambda: call(
            service.app, "POST", f"/families/{rid}", cancel_when=cancel_when, deadline=DEADLINE
        )

    async with service.run():
        exchanges = await drive(request(rid) for rid in range(len(families)))
        tally = service.tally
        for rid, (family, exchange) in enumerate(zip(families, exchanges, strict=True)):
            tally.saw(exchange)
            if family.fate != "none":
                tally.faults[family.fate] += 1
            for fate in family.children:
                if fate not in ("none", "parked", "connection killed"):
                    tally.faults[f"child {fate}"] += 1
            if family.fate == "none":
                service.expect(f"request {rid}", exchange, is_2xx)
            elif family.fate == "client went away":
                service.expect(f"request {rid} (client went away)", exchange, cancelled_unanswered)
            else:
                wanted = failed_with(500, InjectedError)
                service.expect(f"request {rid} ({family.fate})", exchange, wanted)
            names = [f"r{rid}c{number}" for number in range(len(family.children))]
            if exchange.acknowledged:
                # The 2xx lists the children that committed: exactly the healthy ones, and
                # exactly those rows must exist.
                reported = json.loads(exchange.body)["ok"]
                healthy = [n for n, fate in enumerate(family.children) if fate == "none"]
                if reported != healthy:
                    tally.violated("each child ends as it must", f"request {rid}: {reported} ok")
                service.expected.add(f"r{rid}")
                service.expected |= {names[number] for number in reported}
            else:
                # Documented: a child commits when its own work ends, so healthy children that
                # finished before the request failed may keep their rows; no other may.
                service.allowed |= {
                    name
                    for name, fate in zip(names, family.children, strict=True)
                    if fate == "none" and name in finished
                }


# -- the database restarts ----------------------------------------------------------------------


def through(proxy: TcpProxy, database: Database) -> str:
    return make_url(database.url).set(host="127.0.0.1", port=proxy.port).render_as_string(False)


CONNECT_TIMEOUT = 3  # seconds; connect_args of the app's engine
POOL_TIMEOUT = 2  # seconds; the app's engine's pool_timeout
OUTAGE_DEADLINE = CONNECT_TIMEOUT + POOL_TIMEOUT + 2  # no request may take longer in an outage


async def test_database_restart_fails_fast_then_recovers_without_an_app_restart(
    database: Database,
) -> None:
    """During an outage requests get a quick 5xx; once the server is back, they succeed again."""
    if database.name == "sqlite":
        pytest.skip("SQLite has no server to restart")
    upstream = make_url(database.url)
    proxy = TcpProxy(upstream.host or "127.0.0.1", upstream.port or 0)
    await proxy.up()
    timeout_key = "timeout" if database.name == "postgresql" else "connect_timeout"
    service = Service(
        database,
        "database restart",
        url=through(proxy, database),
        engine_args={
            "pool_pre_ping": True,
            "pool_timeout": POOL_TIMEOUT,
            "connect_args": {timeout_key: CONNECT_TIMEOUT},
        },
    )
    db = service.db
    batch = 8
    parked: list[asyncio.Event] = []
    outage = asyncio.Event()

    @service.app.post("/writes/{rid}")
    async def write(rid: int) -> dict[str, int]:
        await db.session.execute(new_item(f"r{rid}"))
        return {"id": rid}

    @service.app.post("/parked-writes/{rid}")
    async def parked_write(rid: int) -> dict[str, int]:
        await db.session.execute(new_item(f"r{rid}"))
        parked[rid].set()  # in flight when the server goes away: its commit comes after
        await outage.wait()
        return {"id": rid}

    def request(rid: int, park: bool = False, deadline: float = DEADLINE) -> Callable[[], Any]:
        path = f"/parked-writes/{rid}" if park else f"/writes/{rid}"
        return lambda: call(service.app, "POST", path, deadline=deadline)

    async def phase(name: str, wanted: Callable[[Any], bool], park: bool = False) -> None:
        first = len(parked)
        parked.extend(asyncio.Event() for _ in range(batch))
        rids = range(first, first + batch)
        if park:
            tasks = [asyncio.ensure_future(request(rid, park=True)()) for rid in rids]
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(parked[rid].wait() for rid in rids))
            await proxy.down()
            service.tally.faults["server went away"] += 1
            service.tally.faults["in-flight request cut off"] += batch
            outage.set()
            exchanges = await asyncio.gather(*tasks)
        else:
            deadline = OUTAGE_DEADLINE if name == "during the outage" else DEADLINE
            exchanges = await drive(request(rid, deadline=deadline) for rid in rids)
        for rid, exchange in zip(rids, exchanges, strict=True):
            service.tally.saw(exchange)
            if name == "during the outage":
                service.tally.faults["request during the outage"] += 1
                if exchange.elapsed > OUTAGE_DEADLINE:
                    service.tally.violated(
                        "fail fast", f"request {rid} took {exchange.elapsed:.1f}s"
                    )
            service.expect(f"request {rid} {name}", exchange, wanted)
            if exchange.acknowledged:
                service.expected.add(f"r{rid}")

    try:
        async with service.run():
            for _ in range(max(1, REQUESTS // 60)):
                outage.clear()
                await phase("before the outage", is_2xx)
                await phase("in flight at the outage", failed_with(500), park=True)
                await phase("during the outage", failed_with(500))
                await proxy.up()
                await phase("after the server is back", is_2xx)
    finally:
        await proxy.down()


# -- pool exhaustion ----------------------------------------------------------------------------

CAPACITY = 2  # the pool: pool_size=2, max_overflow=0
QUEUE_TIMEOUT = 0.2
EXHAUSTION_POOL_TIMEOUT = 0.5


@pytest.mark.parametrize("admission", [True, False], ids=["admission", "no-admission"])
async def test_ten_times_the_pool_in_flight_fails_fast_and_never_hangs(
    database: Database, admission: bool
) -> None:
    """With admission control the excess gets quick 503s; without it, quick pool-timeout 500s."""
    options: dict[str, Any] = (
        {"max_concurrent_requests": CAPACITY, "request_queue_timeout": QUEUE_TIMEOUT}
        if admission
        else {}
    )
    service = Service(
        database,
        "pool exhaustion" + (" (admission)" if admission else ""),
        pool_size=CAPACITY,
        max_overflow=0,
        engine_args={"pool_timeout": EXHAUSTION_POOL_TIMEOUT},
        **options,
    )
    db = service.db
    total = CAPACITY * 10
    rounds = max(1, REQUESTS // 100)
    entered = 0
    release = asyncio.Event()

    @service.app.post("/holds/{rid}")
    async def hold(rid: int) -> dict[str, int]:
        nonlocal entered
        entered += 1
        await db.session.execute(text("SELECT 1"))  # takes one of the pool's connections
        await release.wait()
        await db.session.execute(new_item(f"r{rid}"))
        return {"id": rid}

    if admission:
        bound = QUEUE_TIMEOUT + 3.0  # generous: CI machines are busy; a hang is far longer
        excess_outcome = failed_with(503)
    else:
        bound = EXHAUSTION_POOL_TIMEOUT + 3.0
        excess_outcome = failed_with(500, SQLAlchemyPoolTimeout)

    async with service.run():
        for round_ in range(rounds):
            entered = 0
            release.clear()
            rids = range(round_ * total, (round_ + 1) * total)
            tasks = [
                asyncio.ensure_future(call(service.app, "POST", f"/holds/{rid}", deadline=DEADLINE))
                for rid in rids
            ]
            pending = set(tasks)
            try:
                async with asyncio.timeout(DEADLINE):
                    while len(tasks) - len(pending) < total - CAPACITY:
                        _, pending = await asyncio.wait(
                            pending, return_when=asyncio.FIRST_COMPLETED
                        )
            except TimeoutError:
                service.tally.violated("never a deadlock", f"{len(pending)} requests stuck")
            release.set()
            exchanges = await asyncio.gather(*tasks)
            service.tally.faults["request beyond the pool"] += total - CAPACITY
            for rid, exchange in zip(rids, exchanges, strict=True):
                service.tally.saw(exchange)
                if exchange.acknowledged:
                    service.expected.add(f"r{rid}")
                elif exchange.elapsed > bound:
                    service.tally.violated(
                        "the excess fails fast", f"request {rid} took {exchange.elapsed:.2f}s"
                    )
                else:
                    service.expect(f"request {rid} beyond the pool", exchange, excess_outcome)
                    if admission and exchange.headers.get(b"retry-after") is None:
                        service.tally.violated("a 503 says when to retry", f"request {rid}")
            acknowledged = sum(exchange.acknowledged for exchange in exchanges)
            if acknowledged != CAPACITY:
                service.tally.violated(
                    "the pool's capacity is served", f"{acknowledged} of {total} got a 2xx"
                )
            if admission and entered != CAPACITY:
                service.tally.violated("refused requests never reach the app", f"{entered} did")


# -- streaming bodies and background tasks ------------------------------------------------------

STREAM_FAULTS = {
    "none": 2,
    "stream with a 4xx status": 1,
    "client went away before the stream wrote": 1,
    "client went away while the stream wrote": 2,
    "server cancelled the stream": 1,
    "background task, none": 2,
    "server cancelled the background task": 2,
}
PERMITS = 8  # max_concurrent_requests of the streaming service


async def test_streams_and_background_tasks_under_cancellation_keep_the_rules(
    database: Database,
) -> None:
    """Cancelled streams and background tasks keep exactly what they acknowledged, leak nothing."""
    service = Service(
        database,
        "streams and background",
        max_concurrent_requests=PERMITS,
        request_queue_timeout=1.0,
    )
    db = service.db
    random = rng("streams", database.name)
    plan = [Planned(draw(random, STREAM_FAULTS, True)) for _ in range(max(1, REQUESTS // 2))]
    background_done: set[str] = set()

    def request_session_is_finished(rid: int, session: AsyncSession, where: str) -> None:
        """SPEC section 5: the request's session is closed and unusable by now."""
        if session.in_transaction():
            service.tally.violated("the connection is back before the body", f"{where} {rid}")
        try:
            db.session  # noqa: B018 - the read itself is what must fail
        except SessionFinalizedError:
            pass
        else:
            service.tally.violated("the request session is finished", f"{where} {rid}")

    @service.app.post("/streams/{rid}")
    async def stream(rid: int) -> StreamingResponse:
        planned = plan[rid]
        await db.session.execute(new_item(f"r{rid}"))
        session = db.session

        async def body() -> AsyncIterator[bytes]:
            yield b"started;"
            request_session_is_finished(rid, session, "stream")
            if planned.fault == "client went away before the stream wrote":
                planned.reached.set()
                await forever()
            async with db(commit_on_exit=True):
                await db.session.execute(new_item(f"s{rid}"))
                if planned.fault in (
                    "client went away while the stream wrote",
                    "server cancelled the stream",
                ):
                    planned.reached.set()
                    await forever()
            yield b"stored"

        status = 409 if planned.fault == "stream with a 4xx status" else 200
        return StreamingResponse(body(), status_code=status)

    @service.app.post("/background/{rid}")
    async def background(rid: int) -> JSONResponse:
        planned = plan[rid]
        await db.session.execute(new_item(f"r{rid}"))
        session = db.session

        async def task() -> None:
            request_session_is_finished(rid, session, "background task")
            async with db(commit_on_exit=True):
                await db.session.execute(new_item(f"b{rid}"))
                if planned.fault == "server cancelled the background task":
                    planned.reached.set()
                    await forever()
            background_done.add(f"b{rid}")

        return JSONResponse({"id": rid}, background=BackgroundTask(task))

    def request(rid: int) -> Callable[[], Any]:
        fault = plan[rid].fault
        path = f"/background/{rid}" if "background" in fault else f"/streams/{rid}"
        disconnect = plan[rid].reached if fault.startswith("client went away") else None
        cancel = plan[rid].reached if fault.startswith("server cancelled") else None
        return lambda: call(
            service.app,
            "POST",
            path,
            cancel_when=cancel,
            disconnect_when=disconnect,
            deadline=DEADLINE,
        )

    async with service.run():
        exchanges = await drive((request(rid) for rid in range(len(plan))), in_flight=PERMITS)
        for rid, (planned, exchange) in enumerate(zip(plan, exchanges, strict=True)):
            service.tally.saw(exchange)
            if planned.fault not in ("none", "background task, none"):
                service.tally.faults[planned.fault] += 1
            if exchange.acknowledged:  # the status line went out only after the route committed
                service.expected.add(f"r{rid}")
            if exchange.body.endswith(b"stored"):
                service.expected.add(f"s{rid}")
            if planned.fault in ("none", "background task, none"):
                service.expect(f"request {rid}", exchange, lambda e: e.acknowledged and e.complete)
            elif planned.fault == "stream with a 4xx status":
                service.expect(f"request {rid}", exchange, lambda e: e.status == 409 and e.complete)
            else:  # cut short after the status line went out
                service.expect(
                    f"request {rid} ({planned.fault})", exchange, lambda e: e.status == 200
                )
        service.expected |= background_done
        statuses = await every_permit_is_free(service, PERMITS)
        if statuses != [200] * PERMITS:
            service.tally.violated("admission permits never leak", f"statuses {statuses}")


async def every_permit_is_free(service: Service, permits: int) -> list[int | None]:
    """Hold ``permits`` requests in flight at once; their statuses (a 503 means a lost permit)."""
    inside = 0
    all_inside = asyncio.Event()

    @service.app.post("/permits")
    async def permit() -> dict[str, bool]:
        nonlocal inside
        inside += 1
        if inside == permits:
            all_inside.set()
        async with asyncio.timeout(5):
            await all_inside.wait()
        return {"admitted": True}

    exchanges = await asyncio.gather(
        *(call(service.app, "POST", "/permits", deadline=10) for _ in range(permits))
    )
    return [exchange.status for exchange in exchanges]


# -- bad input ----------------------------------------------------------------------------------

PASSWORD = "s3cr3t-pw"


def session_keywords() -> frozenset[str]:
    """The keywords an AsyncSession (and the Session under it) accepts: the documented rule."""
    names = {"class_"}
    for init in (AsyncSession.__init__, Session.__init__):
        names |= {
            parameter.name
            for parameter in inspect.signature(init).parameters.values()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        }
    return frozenset(names - {"self"})


SESSION_KEYWORDS = session_keywords()


SECONDS_GOOD = st.one_of(st.floats(1e-3, 1e6), st.integers(1, 10**6))
SECONDS_BAD = st.one_of(
    st.sampled_from([0, -1, -0.5, 0.0, math.inf, -math.inf, math.nan, True, False, "1", None]),
    st.floats(max_value=0),
)
FRACTION_GOOD = st.one_of(st.none(), st.floats(1e-9, 1.0), st.just(1))
FRACTION_BAD = st.one_of(
    st.sampled_from([0, -0.1, 1.0001, 2, math.nan, math.inf, True, "0.5"]),
    st.floats(min_value=1, exclude_min=True),
)
COUNT_GOOD = st.one_of(st.none(), st.integers(1, 10**6))
COUNT_BAD = st.one_of(st.sampled_from([0, True, False, 1.5, 2.0, "3"]), st.integers(max_value=0))

# (db_url, give a custom_engine too?)
SOURCES_GOOD = st.sampled_from(
    [
        (f"postgresql+asyncpg://user:{PASSWORD}@127.0.0.1:1/x", False),
        (f"mysql+asyncmy://user:{PASSWORD}@127.0.0.1:1/x", False),
        (URL.create("postgresql+asyncpg", "user", PASSWORD, "127.0.0.1", 1, "x"), False),
        ("sqlite+aiosqlite://", False),
        (None, True),
    ]
)
SOURCES_BAD = st.one_of(
    st.sampled_from(
        [
            (f"postgresql+asyncpg://user:{PASSWORD}@127.0.0.1:port/x", False),  # port: no number
            (f"://user:{PASSWORD}@127.0.0.1/x", False),
            (f"nosuchdb://user:{PASSWORD}@127.0.0.1/x", False),  # no such dialect
            (f"postgresql://user:{PASSWORD}@127.0.0.1/x", False),  # default driver: synchronous
            (f"postgresql+psycopg2://user:{PASSWORD}@127.0.0.1/x", False),  # not installed
            (f"mysql+pymysql://user:{PASSWORD}@127.0.0.1/x", False),  # synchronous
            (f"sqlite+aiosqlite://user:{PASSWORD}@/x", False),  # SQLite takes no password
            (5432, False),
            (b"sqlite+aiosqlite://", False),
            (f"postgresql+asyncpg://user:{PASSWORD}@127.0.0.1:1/x", True),  # both
            (None, False),  # neither
        ]
    ),
    # Any URL that carries the password, well formed or not: accepted or refused, never shown.
    st.builds(
        "{}://{}:{}@{}/{}".format,
        st.sampled_from(["postgresql+asyncpg", "mysql+asyncmy", "sqlite+aiosqlite", "x+y", ""]),
        st.text("abc%", max_size=4),  # no ':', '/' or '@': the password stays the password
        st.just(PASSWORD),
        st.text("abc.:%?[]1", max_size=8),
        st.text("abc:/@%?=&", max_size=6),
    ).map(lambda url: (url, False)),
)
ENGINE_ARGS_GOOD = st.sampled_from(
    [None, {}, {"echo": False}, {"pool_pre_ping": True, "pool_recycle": 30}]
)
ENGINE_ARGS_BAD = st.sampled_from(
    [{"pool_sise": 5}, {"connect_args": 3}, {"execution_options": 5}, {"poolclass": 3}, ["echo"]]
)
SESSION_ARGS_GOOD = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["expire_on_commit", "autoflush"]), st.booleans()),
    st.just({"class_": AsyncSession, "autoflush": False}),
)
SESSION_ARGS_BAD = st.one_of(
    st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=14).filter(
            lambda key: key not in SESSION_KEYWORDS
        ),
        st.booleans(),
        min_size=1,
        max_size=2,
    ),
    st.sampled_from(
        [
            {"class_": dict},
            {"class_": None},
            [("autoflush", False)],
            "x",
            {"bind": None},  # the middleware binds its sessions to its own engine
        ]
    ),
)
# Any iterable, as 0.8.1 took it (a bare string is a set of characters there too).
PATHS_GOOD = st.one_of(
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
    st.tuples(st.text(max_size=5)),
    st.text(max_size=5),
    st.lists(st.integers(), min_size=1, max_size=2).map(lambda paths: ["/ok", *paths]),
)
PATHS_BAD = st.one_of(st.integers(), st.floats(allow_nan=False))
INTERVAL_GOOD = st.one_of(SECONDS_GOOD, st.just(0), st.just(0.0))
INTERVAL_BAD = st.one_of(
    st.sampled_from([-1, -0.5, math.inf, -math.inf, math.nan, True, False, "1", None]),
    st.floats(max_value=0, exclude_max=True),
)
ANYTHING = st.one_of(st.booleans(), st.none(), st.integers(0, 2), st.just("yes"))

MIDDLEWARE_ARGUMENTS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "source": (SOURCES_GOOD, SOURCES_BAD),  # db_url and custom_engine
    "engine_args": (ENGINE_ARGS_GOOD, ENGINE_ARGS_BAD),
    "session_args": (SESSION_ARGS_GOOD, SESSION_ARGS_BAD),
    "commit_on_exit": (ANYTHING, ANYTHING),  # any value is taken for its truth
    "exclude_paths": (PATHS_GOOD, PATHS_BAD),
    "pool_warn_threshold": (FRACTION_GOOD, FRACTION_BAD),
    "pool_warn_interval": (INTERVAL_GOOD, INTERVAL_BAD),
    "max_concurrent_requests": (COUNT_GOOD, COUNT_BAD),
    "request_queue_timeout": (SECONDS_GOOD, SECONDS_BAD),
}
SCOPE_ARGUMENTS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "session_args": (SESSION_ARGS_GOOD, SESSION_ARGS_BAD),
    "commit_on_exit": (ANYTHING, ANYTHING),
    "multi_sessions": (ANYTHING, ANYTHING),  # taken for its truth, as in 0.8.1
    "max_concurrent": (COUNT_GOOD, COUNT_BAD),
    # Good deadlines long enough to connect within: a cancelled connect is not what is tested.
    "pool_timeout": (st.one_of(st.none(), st.floats(1, 1e6), st.integers(1, 10**6)), SECONDS_BAD),
}


def corruptions(
    catalog: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]],
) -> list[str]:
    """ "none", each argument that has bad values, and "several" at once."""
    taken_for_truth = {"commit_on_exit", "multi_sessions"}
    return ["none", *(name for name in catalog if name not in taken_for_truth), "several"]


@st.composite
def arguments(
    draw: st.DrawFn,
    catalog: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]],
    corrupted: str,
) -> dict[str, Any]:
    """Good values for every argument but the corrupted one(s), which get bad ones."""
    if corrupted == "several":
        bad = draw(st.sets(st.sampled_from(sorted(catalog)), min_size=2, max_size=4))
    else:
        bad = {corrupted} & set(catalog)
    return {name: draw(pair[name in bad]) for name, pair in catalog.items()}


@pytest.fixture(scope="module")
def bad_input() -> Iterator[dict[str, BadInput]]:
    """The figures of the bad-input tests, published once they have all run."""
    figures = {name: BadInput(f"bad input: {name}") for name in ("middleware", "db(...)")}
    yield figures
    for each in figures.values():
        if each.tally.requests:
            each.tally.publish()


class BadInput:
    """Argument sets tried (counted as requests), bad values by argument, kinds of problems."""

    def __init__(self, scenario: str) -> None:
        self.tally = Tally(scenario, "-")

    def tried(self, corrupted: str, refused: BaseException | None, problems: list[str]) -> None:
        tally = self.tally
        tally.requests += 1
        tally.statuses["refused" if refused is not None else "accepted"] += 1
        if corrupted != "none":
            tally.faults[f"bad {corrupted}"] += 1
        for problem in problems:
            kind = problem.split(":")[0]  # one per kind of problem, not one per example
            if kind not in tally.violations:
                tally.violations.append(kind)

    def __repr__(self) -> str:  # hypothesis prints the test's arguments when an example fails
        return f"<figures of {self.tally.scenario}>"


EXAMPLES = settings(
    max_examples=max(20, REQUESTS // 5),
    deadline=None,
    database=None,  # the seed decides; nothing is kept between runs
    suppress_health_check=list(HealthCheck),
)


REFUSALS = (ValueError, TypeError, FastAPIAsyncSQLAlchemyError)


def is_seconds(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def is_count(value: object) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, int) and value > 0)


def is_fraction(value: object) -> bool:
    return value is None or (
        not isinstance(value, bool) and isinstance(value, int | float) and 0 < value <= 1
    )


def are_paths(value: object) -> bool:
    return value is None or isinstance(value, Iterable)


def is_interval(value: object) -> bool:
    return (value == 0 and not isinstance(value, bool)) or is_seconds(value)


def are_session_args(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or not set(value) <= SESSION_KEYWORDS:
        return False
    session_class = value.get("class_", AsyncSession)
    return isinstance(session_class, type) and issubclass(session_class, AsyncSession)


def refusal_problems(refused: BaseException) -> list[str]:
    """What is wrong with how an argument set was refused: the type, or a multi-line message."""
    kind = type(refused).__name__
    problems = []
    if not isinstance(refused, REFUSALS):
        problems.append(f"refused with a {kind}, not a ValueError/TypeError: {refused}")
    if "\n" in str(refused).strip():
        problems.append(f"the {kind}'s message is not one line: {refused}")
    return problems


def shows_the_password(exc: BaseException) -> bool:
    """Whether the message, the repr or the printed traceback (causes included) holds it."""
    return any(
        PASSWORD in text for text in (str(exc), repr(exc), "".join(traceback.format_exception(exc)))
    )


@pytest.mark.parametrize("corrupted", corruptions(MIDDLEWARE_ARGUMENTS))
@EXAMPLES
@seed(SEED)
@given(data=st.data())
def test_bad_middleware_arguments_are_refused_up_front_and_never_show_the_password(
    bad_input: dict[str, BadInput], corrupted: str, data: st.DataObject
) -> None:
    """Any arguments build a working middleware or raise a one-line ValueError/TypeError that
    allocated nothing; no error, warning, log line or repr shows the URL's password."""
    drawn = data.draw(arguments(MIDDLEWARE_ARGUMENTS, corrupted))
    db_url, custom = drawn.pop("source")
    Middleware, db = create_middleware_and_session_proxy()
    custom_engine = create_async_engine("sqlite+aiosqlite://") if custom else None
    created: list[AsyncEngine] = []
    real_create = fastapi_async_sqlalchemy._engine.create_async_engine

    def spy(*args: Any, **kwargs: Any) -> AsyncEngine:
        engine = real_create(*args, **kwargs)
        created.append(engine)
        return engine

    given = {"db_url": db_url, "custom_engine": custom_engine, **drawn}
    surely_invalid = not all(
        [
            (db_url is None) != (custom_engine is None),
            are_session_args(drawn["session_args"]),
            are_paths(drawn["exclude_paths"]),
            is_fraction(drawn["pool_warn_threshold"]),
            is_interval(drawn["pool_warn_interval"]),
            is_count(drawn["max_concurrent_requests"]),
            is_seconds(drawn["request_queue_timeout"]),
        ]
    )
    logs = Logs()
    root = logging.getLogger()
    level = root.level
    root.addHandler(logs)
    root.setLevel(logging.DEBUG)
    middleware = None
    refused: BaseException | None = None
    shown: tuple[str, ...] = ()
    try:
        fastapi_async_sqlalchemy._engine.create_async_engine = spy  # type: ignore[assignment]
        # A URL option a driver ignores is only warned about (SAWarning): recorded here, so that
        # it is checked for the password too, rather than raised.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                middleware = Middleware(app=unused_app, **given)
            except Exception as exc:
                refused = exc
        if middleware is not None:
            shown = (repr(middleware), repr(db), repr(middleware.engine), str(db.engine.url))
    finally:
        fastapi_async_sqlalchemy._engine.create_async_engine = real_create
        root.removeHandler(logs)
        root.setLevel(level)
        asyncio.run(dispose(middleware, *created, custom_engine))

    problems = []
    if refused is not None:
        kind = type(refused).__name__
        problems += refusal_problems(refused)
        if shows_the_password(refused):
            problems.append(f"the {kind} shows the password")
        if created:
            problems.append(f"an engine was created before the {kind}: {refused}")
        if db._binding is not None:
            problems.append(f"the proxy was bound before the {kind}")
    else:
        assert middleware is not None
        if surely_invalid:
            problems.append(f"invalid arguments accepted: {given}")
        if any(PASSWORD in text for text in shown):
            problems.append("a repr shows the password")
        if middleware.engine_owned is not (custom_engine is None):
            problems.append("engine ownership is wrong")
    if any(PASSWORD in str(warning.message) for warning in caught):
        problems.append("a warning shows the password")
    if any(PASSWORD in line for line in logs.lines):
        problems.append("a log line shows the password")
    bad_input["middleware"].tried(corrupted, refused, problems)
    assert not problems, problems


@pytest.mark.parametrize("corrupted", corruptions(SCOPE_ARGUMENTS))
@EXAMPLES
@seed(SEED)
@given(data=st.data())
def test_bad_scope_arguments_are_refused_before_a_session_is_opened(
    bad_input: dict[str, BadInput], database_url: str, corrupted: str, data: st.DataObject
) -> None:
    """db(...) with any arguments opens a scope whose session works, or raises a one-line
    ValueError/TypeError at the call, before any connection is checked out."""
    drawn = data.draw(arguments(SCOPE_ARGUMENTS, corrupted))
    session_args, multi_sessions = drawn["session_args"], drawn["multi_sessions"]
    max_concurrent, pool_timeout = drawn["max_concurrent"], drawn["pool_timeout"]
    # 'bind' is the middleware's to give: db(...) may drop it or refuse it.
    binds_itself = isinstance(session_args, dict) and "bind" in session_args
    valid = all(
        [
            are_session_args(session_args),
            is_count(max_concurrent),  # with or without multi_sessions, as in 0.8.1
            pool_timeout is None or is_seconds(pool_timeout),
        ]
    )
    pool_events: list[str] = []

    async def open_scope() -> tuple[BaseException | None, BaseException | None]:
        """What the call refused with, or else what entering the scope raised."""
        async with bound(database_url) as db:
            for name in ("checkout", "checkin"):
                event.listen(
                    db.engine.sync_engine, name, lambda *args, name=name: pool_events.append(name)
                )
            try:
                scope = db(**drawn)
            except Exception as exc:
                return exc, None
            try:
                async with scope:  # the scope works
                    if multi_sessions and pool_timeout is not None:
                        # db.session cannot wait within a deadline: the owner is refused it.
                        async with db.connection() as session:
                            await session.execute(text("SELECT 1"))
                    else:
                        await db.session.execute(text("SELECT 1"))
            except PoolTimeoutError:
                # A plain block with pool_timeout checks out its connection on entry, and a
                # short deadline may pass first on a busy machine: a runtime outcome.
                pass
            except Exception as exc:
                return None, exc
            return None, None

    refused, failed = asyncio.run(open_scope())
    problems = []
    if refused is not None:
        kind = type(refused).__name__
        problems += refusal_problems(refused)
        if valid and not binds_itself:
            problems.append(f"valid arguments refused: {refused}")
        if pool_events:
            problems.append(f"a connection was checked out before the {kind}")
    else:
        if not valid:
            problems.append(f"invalid arguments accepted: {drawn}")
        if failed is not None:
            kind = type(failed).__name__
            problems.append(f"accepted arguments fail only on entry, with a {kind}: {failed}")
        if pool_events.count("checkout") != pool_events.count("checkin"):
            problems.append("a connection stayed checked out")
    bad_input["db(...)"].tried(corrupted, refused, problems)
    assert not problems, problems


async def dispose(*owners: Any) -> None:
    """Release the engines of middlewares and engines (``None`` entries are skipped)."""
    for owner in owners:
        if owner is not None:
            await owner.dispose()
