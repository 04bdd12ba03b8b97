"""Awaiting from inside SQLAlchemy's synchronous events.

An ``AsyncSession`` runs its work in a greenlet; an event listener called there can still await
a coroutine, which the event loop then runs, through SQLAlchemy's bridge (renamed in 2.1).
"""

try:
    from sqlalchemy.util import await_ as await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

__all__ = ["await_"]
