"""The ASGI middleware: binds a proxy to an engine and gives each request its scope."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._admission import Admission
from ._config import (
    InvalidTypeError,
    check_optional_seconds,
    check_positive_int,
    check_seconds,
    check_session_args,
    check_url,
    default_session_class,
    make_session_factory,
)
from ._deadlines import install as install_deadlines
from ._deadlines import with_deadline
from ._engine import check_engine_source, create_engine
from ._pgbouncer import pgbouncer_engine_args
from ._pool import SaturationWarning
from ._proxy import Binding, DBSessionMeta, restore
from ._replica_plan import plan_replicas
from ._request import WEBSOCKET_SCOPE_ENDED, RequestScope
from ._router import Router
from ._routing import routed
from ._scope import (
    Scope,
    SessionFactory,
    finalize,
    finalize_after,
    logger,
    watch_savepoint_roots,
)
from ._stats import Observer, observed
from ._tokens import check_read_your_writes
from ._types import ASGIApp, ASGIScope, Message, Receive, Send
from .exceptions import InvalidConfigurationError, ProxyBindingError

if TYPE_CHECKING:
    from ._otel import Telemetry

_LIFESPAN_ENDS = frozenset(
    {"lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed"}
)


class BaseSQLAlchemyMiddleware:
    """Pure ASGI middleware giving every request and websocket connection a session scope.

    Subclasses made by ``create_middleware_and_session_proxy()`` set ``proxy``; use those
    (``SQLAlchemyMiddleware`` is one), not this class directly.
    """

    proxy: ClassVar[DBSessionMeta]

    def __init__(
        self,
        app: ASGIApp,
        db_url: str | URL | None = None,
        custom_engine: AsyncEngine | None = None,
        engine_args: Mapping[str, Any] | None = None,
        session_args: Mapping[str, Any] | None = None,
        commit_on_exit: bool = False,
        exclude_paths: Iterable[str] | None = None,
        pool_warn_threshold: float | None = None,
        pool_warn_interval: float = 10.0,
        max_concurrent_requests: int | None = None,
        request_queue_timeout: float = 0.1,
        statement_timeout: float | None = None,
        stats: bool = False,
        server_timing: bool = False,
        slow_request_threshold: float | None = None,
        n_plus_one_threshold: int | None = None,
        n_plus_one: str = "warn",
        opentelemetry: bool = False,
        replica_urls: Iterable[str | URL] | None = None,
        replica_engines: Iterable[AsyncEngine] | None = None,
        replica_reads: Iterable[str] | Callable[[ASGIScope], bool] | None = None,
        replica_max_lag: float | None = 5.0,
        replica_check_interval: float = 1.0,
        replica_wait: float = 0.01,
        read_your_writes: str | None = "cookie",
        read_your_writes_secret: str | bytes | None = None,
        pgbouncer: bool = False,
    ) -> None:
        # Every check comes before anything is allocated: a refused construction leaves no
        # engine, no pool, and the proxy as it was.
        url = check_engine_source(db_url, custom_engine, engine_args)
        self.session_args = check_session_args(session_args, allow_bind=False)
        self.exclude_paths = _check_exclude_paths(exclude_paths)
        self.pool_warn_threshold = _check_threshold(pool_warn_threshold)
        self.pool_warn_interval = check_seconds(
            "pool_warn_interval", pool_warn_interval, allow_zero=True
        )
        self.max_concurrent_requests = check_positive_int(
            "max_concurrent_requests", max_concurrent_requests
        )
        self.request_queue_timeout = check_seconds("request_queue_timeout", request_queue_timeout)
        self.statement_timeout = check_optional_seconds("statement_timeout", statement_timeout)
        self.server_timing = bool(server_timing)
        self.slow_request_threshold = check_optional_seconds(
            "slow_request_threshold", slow_request_threshold
        )
        self.n_plus_one_threshold = check_positive_int("n_plus_one_threshold", n_plus_one_threshold)
        if n_plus_one not in ("warn", "raise"):
            raise InvalidConfigurationError(
                f'n_plus_one must be "warn" (log a WARNING) or "raise" (fail the request, for '
                f"tests), not {n_plus_one!r}."
            )
        self.commit_on_exit = bool(commit_on_exit)
        replicas = plan_replicas(
            custom_engine.dialect.name if custom_engine is not None else url.get_backend_name(),  # type: ignore[union-attr]
            replica_urls,
            replica_engines,
            check_url,
            max_lag=replica_max_lag,
            check_interval=replica_check_interval,
            wait=replica_wait,
            reads=replica_reads,
        )
        check_read_your_writes(read_your_writes, read_your_writes_secret)
        if pgbouncer:
            if url is None:
                raise InvalidConfigurationError(
                    "pgbouncer=True sets up the engines the middleware creates from db_url; for "
                    "custom_engine, create it with pgbouncer_engine_args(url) instead."
                )
            engine_args = pgbouncer_engine_args(url, engine_args)
        self.proxy._check_bindable(custom_engine)

        self.app = app
        watch_savepoint_roots()
        if custom_engine is not None:
            self.engine = custom_engine
            self.engine_owned = False
        else:
            self.engine = create_engine(url, engine_args)  # type: ignore[arg-type]
            self.engine_owned = True
        self._router: Router | None = None
        if replicas is not None:
            self._router = Router(
                replicas.build(self.engine, lambda url: create_engine(url, engine_args)),
                self.proxy._name,
                read_your_writes,
                read_your_writes_secret,
            )
        session_options = self.session_args
        if self.statement_timeout is not None:
            install_deadlines(self.engine, *self._replica_engines())
            session_options = with_deadline(session_options, self.statement_timeout)
        self._observer: Observer | None = None
        telemetry = _telemetry(self.engine) if opentelemetry else None
        if (
            stats
            or self.server_timing
            or self.slow_request_threshold
            or self.n_plus_one_threshold
            or telemetry is not None
        ):
            self._observer = Observer(
                self.proxy._stats,
                server_timing=self.server_timing,
                slow_request_threshold=self.slow_request_threshold,
                n_plus_one_threshold=self.n_plus_one_threshold,
                n_plus_one=n_plus_one,
                telemetry=telemetry,
            )
            session_options = observed(session_options, self._observer)
        if self._router is not None:
            session_options = routed(session_options, default_session_class(), self._router)
        factory = make_session_factory(self.engine, session_options)
        if self._router is not None:
            self._router.factory = factory
        self._binding = Binding(self.engine, factory, self, self._observer, self._router)
        self._admission = (
            Admission(self.max_concurrent_requests, self.request_queue_timeout)
            if self.max_concurrent_requests is not None
            else None
        )
        # How an HTTP request is served, chosen once: through admission control or not, with
        # replica routing or not.
        self._handle = self._http if self._router is None else self._routed_http
        self._serve_http = self._handle if self._admission is None else self._admitted_http
        self._saturation = (
            SaturationWarning(
                self.engine, self.pool_warn_threshold, self.pool_warn_interval, logger
            )
            if self.pool_warn_threshold is not None
            else None
        )
        self._start()

    def _start(self) -> None:
        """Bind the proxy (again, after a lifespan ended) and watch the pool if asked to."""
        self.proxy._bind(self._binding)
        self._disposed = False
        if self._observer is not None:
            self._observer.attach(self.engine, *self._replica_engines())
        if self._saturation is not None:
            self._saturation.attach()
        if self._router is not None:
            self._router.attach()

    def _replica_engines(self) -> list[AsyncEngine]:
        return self._router.engines() if self._router is not None else []

    def should_commit(self, status_code: int) -> bool:
        """Whether a request that ended with ``status_code`` commits (with ``commit_on_exit``).

        Commits below 400, so a handled ``HTTPException`` does not commit half a request.
        Override in a subclass to change the rule.
        """
        return status_code < 400

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.exclude_paths and scope.get("path") in self.exclude_paths:
                await self.app(scope, receive, send)
            elif self._observer is not None:
                await self._observer.http(self._serve_http, scope, receive, send)
            else:
                await self._serve_http(scope, receive, send)
        elif kind == "websocket":
            if self._observer is not None:
                await self._observer.websocket(self._websocket, scope, receive, send)
            else:
                await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(
        self,
        scope: ASGIScope,
        receive: Receive,
        send: Send,
        factory: SessionFactory | None = None,
    ) -> None:
        request = RequestScope(
            factory or self._binding.factory, send, self.commit_on_exit, self.should_commit
        )
        var = self.proxy._var
        token = var.set(request)
        try:
            await self.app(scope, receive, request.send)
        except BaseException as exc:
            await request.app_raised(exc)
            raise
        else:
            await request.app_returned()
        finally:
            restore(var, token, request)

    async def _admitted_http(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        admission = self._admission
        assert admission is not None  # _serve_http is this method only with admission control
        permit = await admission.admit()
        if permit is None:
            await admission.refuse(send)
            return
        try:
            # The permit comes back with the response's last body message, before any
            # background task of the response runs.
            await self._handle(scope, receive, permit.send_through(send))
        finally:
            permit.release()

    async def _routed_http(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        router = self._router
        assert router is not None  # _handle is this method only with replicas
        await router.http(self._http, scope, receive, send)

    async def _websocket(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        connection = Scope(self._binding.factory)
        var = self.proxy._var
        token = var.set(connection)
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            session = connection.end(WEBSOCKET_SCOPE_ENDED)
            if session is not None:
                await finalize_after(session, exc)
            raise
        else:
            session = connection.end(WEBSOCKET_SCOPE_ENDED)
            if session is not None:
                await finalize(session, commit=self.commit_on_exit)
        finally:
            restore(var, token, connection)

    async def _lifespan(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        try:
            self._start()  # a later lifespan cycle of the same app binds the proxy again
        except ProxyBindingError as exc:
            # Tell the server the app cannot start, then raise, as Starlette's lifespan does.
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise

        async def send_and_dispose(message: Message) -> None:
            if message["type"] in _LIFESPAN_ENDS:
                try:
                    await self.dispose()
                except Exception:
                    logger.exception("Disposing the database engine at lifespan end failed")
                    await send(message)  # the server hears the end all the same, then the error
                    raise
            await send(message)

        await self.app(scope, receive, send_and_dispose)

    async def dispose(self) -> None:
        """Unbind the proxy and release the engine this middleware created.

        Call it where no ASGI lifespan ends the app (scripts, ad-hoc tests). It does nothing more
        once it has succeeded, and really retries after it raised. A ``custom_engine`` is never
        disposed (its creator owns it) and the proxy stays bound to it, as in 0.8: sessions can
        still be opened with ``async with db():`` after the app shut down.
        """
        if self._saturation is not None:
            self._saturation.detach()
        if self._observer is not None:
            self._observer.detach()
        if self._router is not None:
            await self._router.detach()
        if not self.engine_owned:
            return  # the proxy stays bound to the caller's engine, as in 0.8
        self.proxy._unbind(self)
        if not self._disposed:
            await self.engine.dispose()
            self._disposed = True


def _telemetry(engine: AsyncEngine) -> Telemetry:
    try:
        from ._otel import Telemetry
    except ImportError:
        raise InvalidConfigurationError(
            "opentelemetry=True needs OpenTelemetry's API: pip install opentelemetry-api (and "
            "the SDK with an exporter, which decide where the spans and metrics go)."
        ) from None
    return Telemetry(engine)


def _check_exclude_paths(paths: object) -> frozenset[Any]:
    """The paths, as 0.8 took them: any iterable (a bare string is a set of characters)."""
    if paths is None:
        return frozenset()
    if not isinstance(paths, Iterable):
        raise InvalidTypeError(
            f"exclude_paths must be a list of paths such as ['/health'], not {paths!r}."
        )
    return frozenset(paths)


def _check_threshold(threshold: object) -> float | None:
    if threshold is None:
        return None
    message = (
        f"pool_warn_threshold must be a fraction of the pool in (0, 1], such as 0.8, "
        f"not {threshold!r}."
    )
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise InvalidTypeError(message)
    if not 0 < threshold <= 1:
        raise InvalidConfigurationError(message)
    return float(threshold)
