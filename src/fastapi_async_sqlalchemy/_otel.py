"""OpenTelemetry: spans for what only the middleware knows, and the pool as metrics.

Imported only by a middleware built with ``opentelemetry=True`` (which needs
``opentelemetry-api``); nothing here is loaded otherwise. It uses the global tracer and meter
providers, so the app's OpenTelemetry set-up (the SDK, an exporter, the ASGI instrumentation)
decides where the spans go.

- ``session``: from a session's creation to its close, a child of the span current where the
  session was made (the request's server span, or the task's);
- ``COMMIT`` and ``ROLLBACK``: children of their session's span, when something reached the
  database (a rollback is the one a close does on an open transaction: a request answered 4xx,
  a failing block, a read-only request without ``commit_on_exit``);
- ``connection wait``: from a session asking for a connection to the pool handing one over.

Attributes follow OpenTelemetry's database conventions (``db.system.name``, ``db.namespace``,
``server.address``, ``server.port``, ``db.operation.name``). Statements are not recorded, nor
ever their parameters (they may hold personal data). The pool is observed as
``db.client.connection.count`` (by ``db.client.connection.state``: ``idle``, ``used``),
``db.client.connection.max`` and ``db.client.connection.pending_requests`` (tasks waiting for a
connection).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine

from ._pool import pool_status

_SCOPE = "fastapi_async_sqlalchemy"


class Telemetry:
    """The spans of one middleware's engine, and its pool's figures for the metrics."""

    def __init__(self, engine: AsyncEngine) -> None:
        from . import __version__

        self.tracer = trace.get_tracer(_SCOPE, __version__)
        url = engine.url
        name = engine.dialect.name
        system = "mariadb" if getattr(engine.dialect, "is_mariadb", False) else name
        self.attributes: dict[str, Any] = {"db.system.name": system}
        if url.database:
            self.attributes["db.namespace"] = url.database
        if url.host:
            self.attributes["server.address"] = url.host
        if url.port:
            self.attributes["server.port"] = url.port
        self.pool_name = f"{system}://{url.host or ''}/{url.database or ''}"
        self.engine = engine

    # -- spans ----------------------------------------------------------------------------------

    def session_span(self) -> Span:
        return self.tracer.start_span("session", kind=SpanKind.CLIENT, attributes=self.attributes)

    def child(self, parent: Span | None, name: str, start_time: int | None = None) -> Span:
        context = trace.set_span_in_context(parent) if parent is not None else None
        attributes = dict(self.attributes)
        if name in ("COMMIT", "ROLLBACK"):
            attributes["db.operation.name"] = name
        return self.tracer.start_span(
            name,
            context=context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_time,
        )

    @staticmethod
    def failed(span: Span, error: BaseException) -> None:
        # No record_exception(): a database error's message holds the statement and its
        # parameters, which may be personal data.
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attribute("error.type", type(error).__qualname__)

    # -- metrics --------------------------------------------------------------------------------

    def start(self) -> None:
        """Report this engine's pool (again, after its middleware's lifespan restarted)."""
        _instruments()
        _reported.add(self)

    def stop(self) -> None:
        """The engine is disposed: its pool is no longer reported."""
        _reported.discard(self)

    def count(self) -> list[metrics.Observation]:
        status = pool_status(self.engine)
        if status["checked_out"] is None:
            return []
        pool = {"db.client.connection.pool.name": self.pool_name}
        return [
            metrics.Observation(
                status["checked_in"], {**pool, "db.client.connection.state": "idle"}
            ),
            metrics.Observation(
                status["checked_out"], {**pool, "db.client.connection.state": "used"}
            ),
        ]

    def capacity(self) -> list[metrics.Observation]:
        capacity = pool_status(self.engine)["capacity"]
        if capacity is None:
            return []
        return [metrics.Observation(capacity, {"db.client.connection.pool.name": self.pool_name})]

    def pending(self) -> list[metrics.Observation]:
        # SQLAlchemy's asyncio pools queue their waiters in an asyncio.Queue, made on first use.
        made = getattr(getattr(self.engine.pool, "_pool", None), "__dict__", {})
        getters = getattr(made.get("_queue"), "_getters", None) or ()
        waiting = sum(1 for getter in list(getters) if not getter.done())
        return [metrics.Observation(waiting, {"db.client.connection.pool.name": self.pool_name})]


# Every engine reported, by instruments made once per meter: a meter keeps the first callbacks
# given for a name, so one set of callbacks serves every pool.
_reported: weakref.WeakSet[Telemetry] = weakref.WeakSet()
_equipped: weakref.WeakSet[Any] = weakref.WeakSet()


def _instruments() -> None:
    from . import __version__

    meter = metrics.get_meter(_SCOPE, __version__)
    try:
        if meter in _equipped:
            return
        _equipped.add(meter)
    except TypeError:  # a meter that cannot be weakly referenced: equip it every time
        pass
    for name, key, unit, description in (
        ("db.client.connection.count", "count", "{connection}", "Connections, by state."),
        ("db.client.connection.max", "capacity", "{connection}", "The most connections allowed."),
        (
            "db.client.connection.pending_requests",
            "pending",
            "{request}",
            "Tasks waiting for a connection.",
        ),
    ):
        meter.create_observable_up_down_counter(
            name, callbacks=[_observe(key)], unit=unit, description=description
        )


def _observe(key: str) -> Any:
    def callback(options: Any) -> Iterator[metrics.Observation]:
        for telemetry in list(_reported):
            yield from getattr(telemetry, key)()

    return callback
