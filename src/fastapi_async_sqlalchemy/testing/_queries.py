"""Counting the statements an app sends: ``assert_num_queries(n)``, ``assert_max_queries(n)``.

While a block runs, a ``before_cursor_execute`` listener on the engine of every proxy (those
bound already and those bound during the block) records each statement and the line of user
code that sent it. Async engines run statements in a greenlet whose own stack ends inside
SQLAlchemy: the caller is found by walking on into the parent greenlet's frames, where the
awaiting coroutine is suspended. Savepoint statements (``SAVEPOINT``, ``RELEASE``,
``ROLLBACK TO``) are not counted: they are transaction bookkeeping, not the app's queries;
neither are the statements ``isolated()`` sends itself (marked with the ``KIT`` option).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .. import _proxy
from .._where import caller

__all__ = ["Queries", "Query", "assert_max_queries", "assert_num_queries", "capture_queries"]

_BOOKKEEPING = re.compile(r"\s*(SAVEPOINT|RELEASE\s+SAVEPOINT|ROLLBACK\s+TO\s+SAVEPOINT)\b", re.I)
# The execution option that marks the testing kit's own statements (isolated() opening and
# checking its transaction): never the app's queries.
KIT = "fastapi_async_sqlalchemy.testing"


@dataclass(frozen=True)
class Query:
    """One statement sent to the database, and where the app sent it from."""

    statement: str
    location: str  # "path/to/file.py:LINE" of the user code that awaited it, or "unknown"

    def __str__(self) -> str:
        return f"{' '.join(self.statement.split())}  ({self.location})"


@dataclass
class Queries:
    """The statements recorded by :func:`capture_queries`, in the order they were sent."""

    queries: list[Query] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[Query]:
        return iter(self.queries)

    def report(self) -> str:
        return "\n".join(f"  {number}. {query}" for number, query in enumerate(self, 1))


@contextmanager
def capture_queries() -> Iterator[Queries]:
    """Record every statement any proxy's engine sends inside the block (children of
    multi-session blocks, ``db.gather()`` and background tasks included)."""
    recorded = Queries()

    def record(
        connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        kits = context is not None and context.execution_options.get(KIT)
        if not kits and not _BOOKKEEPING.match(statement):
            recorded.queries.append(Query(statement, caller()))

    watched: list[Engine] = []

    def watch(binding: _proxy.Binding) -> None:
        sync_engine = binding.engine.sync_engine
        if sync_engine not in watched:
            watched.append(sync_engine)
            event.listen(sync_engine, "before_cursor_execute", record)

    for proxy in list(_proxy.proxies):
        binding = proxy._binding
        if binding is not None:
            watch(binding)
    _proxy.bind_watchers.append(watch)
    try:
        yield recorded
    finally:
        _proxy.bind_watchers.remove(watch)
        for sync_engine in watched:
            event.remove(sync_engine, "before_cursor_execute", record)


@contextmanager
def assert_num_queries(expected: int) -> Iterator[Queries]:
    """Fail (``AssertionError``) unless the block sends exactly ``expected`` statements; the
    message lists each one with the line that sent it."""
    with capture_queries() as queries:
        yield queries
    if len(queries) != expected:
        raise AssertionError(
            f"Expected {expected} queries, {len(queries)} were sent:\n{queries.report()}"
        )


@contextmanager
def assert_max_queries(limit: int) -> Iterator[Queries]:
    """Fail (``AssertionError``) if the block sends more than ``limit`` statements; the
    message lists each one with the line that sent it."""
    with capture_queries() as queries:
        yield queries
    if len(queries) > limit:
        raise AssertionError(
            f"Expected at most {limit} queries, {len(queries)} were sent:\n{queries.report()}"
        )
