"""OpenTelemetry: spans for what only the middleware knows, and the pool as metrics.

Imported only by a middleware built with ``opentelemetry=True`` (which needs
``opentelemetry-api``); nothing here is loaded otherwise. It uses the global tracer and meter
providers, so the app's OpenTelemetry set-up (the SDK, an exporter, the ASGI instrumentation)
decides where the spans go.

- ``session``: from a session's creation to its close, a child of the span current where the
  session was made (the request's server span, or the task's);
- ``COMMIT`` and ``ROLLBACK``: children of their session's span (a rollback is the one a close
  does on an open transaction: a request answered 4xx, a failing block);
- ``connection wait``: from a session asking for a connection to the pool handing one over.

Attributes follow OpenTelemetry's database conventions (``db.system.name``, ``db.namespace``,
``server.address``, ``server.port``, ``db.operation.name``). Statements are not recorded, nor
ever their parameters (they may hold personal data). The pool is observed as
``db.client.connection.count`` (by ``db.client.connection.state``: ``idle``, ``used``),
``db.client.connection.max`` and ``db.client.connection.pending_requests`` (tasks waiting for a
connection).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine

from ._pool import pool_status

_SCOPE = "fastapi_async_sqlalchemy"


class Telemetry:
    """The spans and metrics of one middleware's engine."""

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
        meter = metrics.get_meter(_SCOPE, __version__)
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._count],
            unit="{connection}",
            description="Connections of the pool, by state.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._max],
            unit="{connection}",
            description="The most connections the pool may hold open.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._pending],
            unit="{request}",
            description="Tasks waiting for a connection of the pool.",
        )
        self.observing = True

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
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attribute("error.type", type(error).__qualname__)

    # -- metrics --------------------------------------------------------------------------------

    def _count(self, options: Any) -> Iterator[metrics.Observation]:
        if not self.observing:
            return
        status = pool_status(self.engine)
        if status["checked_out"] is None:
            return
        base = {"db.client.connection.pool.name": self.pool_name}
        yield metrics.Observation(
            status["checked_in"], {**base, "db.client.connection.state": "idle"}
        )
        yield metrics.Observation(
            status["checked_out"], {**base, "db.client.connection.state": "used"}
        )

    def _max(self, options: Any) -> Iterator[metrics.Observation]:
        if not self.observing:
            return
        capacity = pool_status(self.engine)["capacity"]
        if capacity is not None:
            yield metrics.Observation(capacity, {"db.client.connection.pool.name": self.pool_name})

    def _pending(self, options: Any) -> Iterator[metrics.Observation]:
        if not self.observing:
            return
        # SQLAlchemy's asyncio pools queue their waiters in an asyncio.Queue, made on first use.
        made = getattr(getattr(self.engine.pool, "_pool", None), "__dict__", {})
        getters = getattr(made.get("_queue"), "_getters", None) or ()
        waiting = sum(1 for getter in list(getters) if not getter.done())
        yield metrics.Observation(waiting, {"db.client.connection.pool.name": self.pool_name})

    def stop(self) -> None:
        """The engine is disposed: the instruments observe nothing until it is used again."""
        self.observing = False

    def start(self) -> None:
        self.observing = True
