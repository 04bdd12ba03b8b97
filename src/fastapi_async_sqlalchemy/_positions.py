"""Replication positions: where the primary is after a commit, how far a replica has replayed.

- PostgreSQL: WAL positions (``'16/B374D848'``), as numbers. After a commit the primary's
  *insert* position is read: it is past the commit record, where the *write* position of a
  primary committing asynchronously may not be yet. A replica has replayed a position when its
  ``pg_last_wal_replay_lsn()`` is at least that far.
- MariaDB: GTID positions (``'0-1-42,1-2-7'``, one ``domain-server-sequence`` per replication
  domain). After a commit the primary's ``@@gtid_binlog_pos`` is read (empty without a binary
  log: no position). A replica has replayed a position when, in every domain of it, its
  ``@@gtid_slave_pos`` has a sequence number at least as high; ``MASTER_GTID_WAIT()`` waits for
  that on the replica.

Other databases have no positions: a read-your-writes token then sends its holder to the
primary until it expires.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# A WAL position (a number) or a GTID position (its text).
Position = int | str

_SHORT_PAGE_HEADER = 24  # the size of a WAL page's header (but a segment's first page)
_GTID = re.compile(r"\d+-\d+-\d+(,\s*\d+-\d+-\d+)*")


def parse_lsn(text: str | None) -> int | None:
    """A PostgreSQL WAL position (``'16/B374D848'``) as a number."""
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def replayable(position: int, wal_block: int | None) -> int:
    """The replay position that covers a WAL insert position.

    When the last record ended at a page boundary, the insert position points past the next
    page's header, where no replay position will be until another record is written. No record
    ends inside a page header, so the boundary itself is as safe. (A segment's first page has a
    longer header, whose size depends on the segment size: those positions are kept as they
    are, which is safe too.)
    """
    if wal_block and position % wal_block == _SHORT_PAGE_HEADER:
        return position - _SHORT_PAGE_HEADER
    return position


def parse_gtids(position: str) -> dict[int, int]:
    """A GTID position as ``{domain: sequence number}``."""
    found: dict[int, int] = {}
    for gtid in position.split(","):
        domain, _, rest = gtid.strip().partition("-")
        sequence = rest.rpartition("-")[2]
        found[int(domain)] = max(found.get(int(domain), 0), int(sequence))
    return found


def is_gtid(position: str) -> bool:
    return _GTID.fullmatch(position) is not None


class Positions:
    """How one database tells positions (see the module's docstring)."""

    async def after_commit(self, conn: AsyncConnection) -> Position | None:
        raise NotImplementedError

    async def replayed(self, conn: AsyncConnection) -> Position | None:
        """How far the replica of ``conn`` has replayed."""
        raise NotImplementedError

    def reached(self, replayed: Position | None, wanted: Position) -> bool:
        raise NotImplementedError

    async def wait(self, conn: AsyncConnection, wanted: Position, seconds: float) -> bool:
        """Whether the replica of ``conn`` replays up to ``wanted`` within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            if self.reached(await self.replayed(conn), wanted):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.002, left))


class WalPositions(Positions):
    """PostgreSQL."""

    def __init__(self) -> None:
        self.wal_block: int | None = None  # the WAL page size, read by the health checks

    async def after_commit(self, conn: AsyncConnection) -> Position | None:
        position = parse_lsn(await conn.scalar(text("SELECT pg_current_wal_insert_lsn()::text")))
        return None if position is None else replayable(position, self.wal_block)

    async def replayed(self, conn: AsyncConnection) -> Position | None:
        return parse_lsn(await conn.scalar(text("SELECT pg_last_wal_replay_lsn()::text")))

    def reached(self, replayed: Position | None, wanted: Position) -> bool:
        return isinstance(replayed, int) and isinstance(wanted, int) and replayed >= wanted


class GtidPositions(Positions):
    """MariaDB."""

    async def after_commit(self, conn: AsyncConnection) -> Position | None:
        position = await conn.scalar(text("SELECT @@gtid_binlog_pos"))
        return str(position) if position and is_gtid(str(position)) else None

    async def replayed(self, conn: AsyncConnection) -> Position | None:
        position = await conn.scalar(text("SELECT @@gtid_slave_pos"))
        return str(position) if position and is_gtid(str(position)) else None

    def reached(self, replayed: Position | None, wanted: Position) -> bool:
        if not isinstance(replayed, str) or not isinstance(wanted, str):
            return False
        have = parse_gtids(replayed)
        return all(
            have.get(domain, -1) >= sequence for domain, sequence in parse_gtids(wanted).items()
        )

    async def wait(self, conn: AsyncConnection, wanted: Position, seconds: float) -> bool:
        waited: Any = await conn.scalar(
            text("SELECT MASTER_GTID_WAIT(:position, :seconds)"),
            {"position": wanted, "seconds": seconds},
        )
        return bool(waited == 0)


def positions_for(dialect: str) -> Positions | None:
    if dialect == "postgresql":
        return WalPositions()
    if dialect in ("mysql", "mariadb"):
        return GtidPositions()
    return None
