"""Helpers for testing apps that use ``db.session``, with or without pytest.

``async with isolated():`` rolls back everything the app writes inside it (the ``db_isolation``
fixture); ``assert_num_queries(n)`` and ``assert_max_queries(n)`` count the statements an app
sends through any proxy inside a block; ``capture_queries()`` records them;
``capture_on_commit_callbacks()`` collects what ``db.on_commit`` would run. Installed with the
package, they are also pytest fixtures (the plugin registers itself; it does nothing until a
test asks for one of them).
"""

from ._callbacks import capture_on_commit_callbacks
from ._isolation import IsolationError, isolated
from ._queries import Queries, Query, assert_max_queries, assert_num_queries, capture_queries

__all__ = [
    "IsolationError",
    "Queries",
    "Query",
    "assert_max_queries",
    "assert_num_queries",
    "capture_on_commit_callbacks",
    "capture_queries",
    "isolated",
]
