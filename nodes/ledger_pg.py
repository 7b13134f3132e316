"""The ledger in PostgreSQL: what payment-server replicas share.

Tables live in the schema ``{prefix}_ledger`` (``nodes.sql_pg.PgConn``);
payments run at READ COMMITTED, snapshots at REPEATABLE READ so accounts and
payments agree; ``seq`` orders payments made in the same millisecond.
"""

from __future__ import annotations

from .ledger import FAILURES, Ledger
from .sql import DbUrl
from .sql_pg import POOL_MAX, PgConn

ROLE = "ledger"


class PgLedger(Ledger):
    """The ledger in the schema ``{prefix}_ledger`` of the PostgreSQL database at ``url``."""

    def __init__(self, url: DbUrl, *, readonly: bool = False, pool_max: int = POOL_MAX) -> None:
        self.url = url
        super().__init__(PgConn(url, ROLE, FAILURES, readonly=readonly, pool_max=pool_max))
