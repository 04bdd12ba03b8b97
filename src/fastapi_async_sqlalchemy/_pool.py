"""A snapshot of a connection pool's use, for ``db.pool_status()``, errors and warnings."""

from __future__ import annotations

from typing import Any

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
