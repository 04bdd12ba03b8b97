"""A connection pool's use: snapshots for ``db.pool_status()`` and errors, and warnings."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool


def pool_status(engine: AsyncEngine) -> dict[str, Any]:
    """Sizes and use of ``engine``'s pool; the numbers are ``None`` for pools without limits.

    ``capacity`` is ``size + max_overflow`` (``None`` with unlimited overflow), ``available``
    what is left of it, and ``saturation`` the checked-out share of it, from 0.0 to 1.0.
    """
    pool = engine.pool
    status: dict[str, Any] = {
        "pool_class": type(pool).__name__,
        "size": None,
        "max_overflow": None,
        "capacity": None,
        "checked_in": None,
        "checked_out": None,
        "available": None,
        "saturation": None,
    }
    if isinstance(pool, QueuePool):
        size = pool.size()
        max_overflow: int = pool._max_overflow
        checked_out = pool.checkedout()
        status.update(
            size=size,
            max_overflow=max_overflow,
            checked_in=pool.checkedin(),
            checked_out=checked_out,
        )
        if max_overflow >= 0 and size + max_overflow > 0:
            capacity = size + max_overflow
            status.update(
                capacity=capacity,
                available=max(capacity - checked_out, 0),
                saturation=checked_out / capacity,
            )
    return status


class SaturationWarning:
    """Logs a WARNING when a checkout leaves the pool at or above ``threshold`` of capacity.

    At most one per ``interval`` seconds; the first is never held back. It listens to the
    engine's ``checkout`` event between :meth:`attach` and :meth:`detach`.
    """

    def __init__(
        self, engine: AsyncEngine, threshold: float, interval: float, logger: logging.Logger
    ) -> None:
        self.engine = engine
        self.threshold = threshold
        self.interval = interval
        self.logger = logger
        self.last: float | None = None

    def attach(self) -> None:
        if not event.contains(self.engine.sync_engine, "checkout", self.on_checkout):
            event.listen(self.engine.sync_engine, "checkout", self.on_checkout)

    def detach(self) -> None:
        if event.contains(self.engine.sync_engine, "checkout", self.on_checkout):
            event.remove(self.engine.sync_engine, "checkout", self.on_checkout)

    def on_checkout(self, *_: object) -> None:
        status = pool_status(self.engine)
        saturation = status["saturation"]
        if saturation is None or saturation < self.threshold:
            return
        now = time.monotonic()
        if self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        self.logger.warning(
            "Database pool is %d%% saturated: %s of %s connections checked out "
            "(pool_warn_threshold=%s). Raise pool_size/max_overflow or hold connections for "
            "less time.",
            round(saturation * 100),
            status["checked_out"],
            status["capacity"],
            self.threshold,
        )
