"""Helpers for testing apps that use ``db.session``, with or without pytest.

``assert_num_queries(n)`` and ``assert_max_queries(n)`` count the statements an app sends through
any proxy inside a block; ``capture_queries()`` records them. Installed with the package, they
are also pytest fixtures (the plugin registers itself; it does nothing until a test asks for one
of them).
"""

from ._queries import Queries, Query, assert_max_queries, assert_num_queries, capture_queries

__all__ = ["Queries", "Query", "assert_max_queries", "assert_num_queries", "capture_queries"]
