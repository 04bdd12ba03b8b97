"""OpenTelemetry: spans for sessions, commits, rollbacks and pool waits; the pool as metrics.

The spans and metrics go to the SDK's in-memory exporter and reader, put in place of the global
providers for each test only (the rest of the suite keeps OpenTelemetry's no-op defaults).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Database, Row, make_app, new_item, serve
from fastapi import HTTPException
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from fastapi_async_sqlalchemy import InvalidConfigurationError, create_middleware_and_session_proxy

pytestmark = pytest.mark.anyio


class Telemetry:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, *names: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name in names]

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = [
                        (dict(point.attributes or {}), getattr(point, "value", None))
                        for point in metric.data.data_points
                    ]
        return found


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Telemetry]:
    recorded = Telemetry()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: recorded.tracer_provider)
    monkeypatch.setattr(
        "opentelemetry.metrics._internal.get_meter_provider", lambda: recorded.meter_provider
    )
    yield recorded
    recorded.tracer_provider.shutdown()
    recorded.meter_provider.shutdown()


async def test_a_requests_sessions_commits_and_rollbacks_are_spans(
    database: Database, telemetry: Telemetry
) -> None:
    app, db = make_app(database, commit_on_exit=True, opentelemetry=True)

    async def child() -> None:
        await db.session.execute(select(1))

    @app.post("/work")
    async def work() -> None:
        await db.session.execute(new_item("secret-value"))
        async with db(multi_sessions=True, commit_on_exit=True):
            await db.gather(child(), child())

    @app.post("/refused")
    async def refused() -> None:
        await db.session.execute(new_item("refused"))
        raise HTTPException(409)

    async with serve(app) as client:
        assert (await client.post("/work")).status_code == 200
        assert (await client.post("/refused")).status_code == 409

    sessions = telemetry.spans("session")
    # Each a child of the span current where the session was made (FastAPI's own endpoint
    # span here): the request's and its two children's in one trace, the 409's in another.
    assert all(span.parent is not None for span in sessions)
    by_trace: dict[int, int] = {}
    for span in sessions:
        by_trace[span.context.trace_id] = by_trace.get(span.context.trace_id, 0) + 1
    assert sorted(by_trace.values()) == [1, 3]
    commits = telemetry.spans("COMMIT")
    assert len(commits) == 3  # the request and its two children
    session_ids = {span.context.span_id for span in sessions}
    assert all(span.parent is not None and span.parent.span_id in session_ids for span in commits)
    [rollback] = telemetry.spans("ROLLBACK")  # the 409
    assert rollback.attributes is not None
    assert rollback.attributes["db.operation.name"] == "ROLLBACK"
    assert telemetry.spans("connection wait")
    for span in telemetry.spans("session", "COMMIT", "ROLLBACK", "connection wait"):
        attributes = dict(span.attributes or {})
        assert attributes["db.system.name"] in ("sqlite", "postgresql", "mariadb", "mysql")
        # No statement, and never a parameter: they may hold personal data.
        assert not any("secret-value" in str(value) for value in attributes.values())
        assert not any("INSERT" in str(value) for value in attributes.values())


async def test_a_failed_commit_is_an_error_span(database: Database, telemetry: Telemetry) -> None:
    app, db = make_app(database, opentelemetry=True)
    await database.insert("taken")
    async with serve(app):
        async with db():
            taken_id = (await db.session.execute(text("SELECT min(id) FROM items"))).scalar()
        with pytest.raises(IntegrityError, match=r"(?i)unique|duplicate|constraint"):
            async with db(commit_on_exit=True):
                db.session.add(Row(id=taken_id, name="again"))  # flushed, and refused, at commit
    [commit] = telemetry.spans("COMMIT")
    assert commit.status.status_code is StatusCode.ERROR
    assert commit.attributes is not None
    assert "error.type" in commit.attributes
    # The error's message holds the statement and its parameters: it is not recorded.
    recorded = " ".join(str(event.attributes) for event in commit.events)
    assert "again" not in recorded
    assert "INSERT" not in recorded.upper()


async def test_the_pool_is_observed_as_metrics(database: Database, telemetry: Telemetry) -> None:
    app, db = make_app(database, opentelemetry=True, engine_args={"pool_size": 3})
    async with serve(app), db():
        await db.session.execute(select(1))
        metrics = telemetry.metrics()
    counts = {
        attributes["db.client.connection.state"]: value
        for attributes, value in metrics["db.client.connection.count"]
    }
    assert counts["used"] == 1
    [(_, capacity)] = metrics["db.client.connection.max"]
    assert capacity == 3 + 10  # pool_size + SQLAlchemy's default max_overflow


async def test_tasks_waiting_for_a_connection_are_observed(
    database: Database, telemetry: Telemetry
) -> None:
    app, db = make_app(
        database, opentelemetry=True, engine_args={"pool_size": 1, "max_overflow": 0}
    )
    async with serve(app):

        async def query() -> None:
            async with db():
                await db.session.execute(select(1))

        async with db.engine.connect() as holder:  # the pool's only connection
            await holder.execute(select(1))
            waiting = asyncio.create_task(query())
            for _ in range(200):  # until the task waits for the pool (at most 10 s)
                await asyncio.sleep(0.05)
                pending = telemetry.metrics()["db.client.connection.pending_requests"]
                if pending[0][1]:
                    break
        await waiting
        after = telemetry.metrics()["db.client.connection.pending_requests"]
    assert [value for _, value in pending] == [1]
    assert [value for _, value in after] == [0]


def test_without_opentelemetry_nothing_of_it_is_loaded(tmp_path: Any) -> None:
    code = (
        "import sys\n"
        "from fastapi_async_sqlalchemy import SQLAlchemyMiddleware\n"
        f"url = 'sqlite+aiosqlite:///{tmp_path}/x.db'\n"
        "m = SQLAlchemyMiddleware(None, db_url=url, stats=True)\n"
        "assert 'fastapi_async_sqlalchemy._otel' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_asking_without_opentelemetry_installed_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "fastapi_async_sqlalchemy._otel", raising=False)
    Middleware, db = create_middleware_and_session_proxy()
    with pytest.raises(InvalidConfigurationError, match="pip install opentelemetry-api"):
        Middleware(None, db_url="sqlite+aiosqlite://", opentelemetry=True)  # type: ignore[arg-type]
    assert db._binding is None


async def test_every_engine_is_reported(
    database: Database, telemetry: Telemetry, tmp_path: Any
) -> None:
    app, db = make_app(database, opentelemetry=True)
    Other, other = create_middleware_and_session_proxy()
    second = Other(None, db_url=f"sqlite+aiosqlite:///{tmp_path}/other.db", opentelemetry=True)
    async with serve(app), db(), other():
        await db.session.execute(select(1))
        await other.session.execute(select(1))
        reported = telemetry.metrics()["db.client.connection.count"]
    await second.dispose()
    pools = {attributes["db.client.connection.pool.name"] for attributes, _ in reported}
    assert len(pools) == 2


async def test_no_rollback_span_when_nothing_reached_the_database(
    database: Database, telemetry: Telemetry
) -> None:
    app, db = make_app(database, opentelemetry=True)

    @app.post("/nothing-sent")
    async def nothing_sent() -> None:
        db.session.add(Row(id=999_999, name="never flushed"))
        raise HTTPException(404)

    async with serve(app) as client:
        assert (await client.post("/nothing-sent")).status_code == 404
    assert len(telemetry.spans("session")) == 1
    assert telemetry.spans("ROLLBACK") == []
