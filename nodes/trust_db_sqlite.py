"""The trust database in SQLite: the embedded default, one trust-server process per file.

One aiosqlite connection (``nodes.sql.SqliteConn``): WAL journal,
``synchronous=FULL`` so a commit survives a power cut, foreign keys on, every
unit of work one ``BEGIN IMMEDIATE ... COMMIT``.
"""

from __future__ import annotations

from pathlib import Path

from .sql import SqliteConn
from .trust_db import FAILURES, TrustDb


class SqliteTrustDb(TrustDb):
    """The trust database file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(SqliteConn(self.path, FAILURES))
