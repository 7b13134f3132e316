"""The ledger in SQLite: the embedded default, one payment-server process per file.

One aiosqlite connection (``nodes.sql.SqliteConn``); every write is a ``BEGIN
IMMEDIATE`` transaction, so writers in other processes wait on the busy
timeout; WAL lets the CLI read while the server writes; ``synchronous=FULL``
puts a commit on disk before the server answers.
"""

from __future__ import annotations

from pathlib import Path

from .ledger import FAILURES, Ledger
from .sql import SqliteConn


class SqliteLedger(Ledger):
    """The ledger database file at ``path``."""

    def __init__(self, path: Path, *, readonly: bool = False, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        super().__init__(SqliteConn(self.path, FAILURES, readonly=readonly, busy_timeout_s=busy_timeout_s))
