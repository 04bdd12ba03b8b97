"""The pytest plugin of fastapi-async-sqlalchemy (entry point ``pytest11``).

It only defines fixtures: nothing runs, and nothing of the package is touched, until a test
asks for one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from ._queries import Queries, assert_max_queries, assert_num_queries


@pytest.fixture(name="assert_num_queries")
def assert_num_queries_fixture() -> Callable[[int], AbstractContextManager[Queries]]:
    """``with assert_num_queries(n):`` fails unless the block sends exactly n statements."""
    return assert_num_queries


@pytest.fixture(name="assert_max_queries")
def assert_max_queries_fixture() -> Callable[[int], AbstractContextManager[Queries]]:
    """``with assert_max_queries(n):`` fails if the block sends more than n statements."""
    return assert_max_queries
