"""The pytest plugin of fastapi-async-sqlalchemy (entry point ``pytest11``).

It only defines fixtures: nothing runs, and nothing of the package is touched, until a test
asks for one of them. ``db_isolation`` is an async fixture: it runs under the anyio plugin
(``@pytest.mark.anyio``) or pytest-asyncio in auto mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import pytest

from ._callbacks import capture_on_commit_callbacks
from ._isolation import isolated
from ._queries import Queries, assert_max_queries, assert_num_queries


@pytest.fixture
async def db_isolation() -> AsyncIterator[None]:
    """The test runs inside ``isolated()``: whatever the app writes is rolled back at its end."""
    async with isolated():
        yield


@pytest.fixture(name="assert_num_queries")
def assert_num_queries_fixture() -> Callable[[int], AbstractContextManager[Queries]]:
    """``with assert_num_queries(n):`` fails unless the block sends exactly n statements."""
    return assert_num_queries


@pytest.fixture(name="assert_max_queries")
def assert_max_queries_fixture() -> Callable[[int], AbstractContextManager[Queries]]:
    """``with assert_max_queries(n):`` fails if the block sends more than n statements."""
    return assert_max_queries


@pytest.fixture(name="capture_on_commit_callbacks")
def capture_on_commit_callbacks_fixture() -> Callable[
    ..., AbstractAsyncContextManager[list[Callable[[], Any]]]
]:
    """``async with capture_on_commit_callbacks(execute=False) as callbacks:`` collects what
    ``db.on_commit`` would run after each commit instead of running it."""
    return capture_on_commit_callbacks
