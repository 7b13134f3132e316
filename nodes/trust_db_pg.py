"""The trust database in PostgreSQL: what trust-server replicas share.

Tables in the schema ``{prefix}_trust`` (``nodes.sql_pg.PgConn``), every unit
of work at READ COMMITTED.
"""

from __future__ import annotations

from .sql import DbUrl
from .sql_pg import POOL_MAX, PgConn
from .trust_db import FAILURES, TrustDb

ROLE = "trust"


class PgTrustDb(TrustDb):
    """The trust database in the schema ``{prefix}_trust`` of the PostgreSQL database at ``url``."""

    def __init__(self, url: DbUrl, *, pool_max: int = POOL_MAX) -> None:
        self.url = url
        super().__init__(PgConn(url, ROLE, FAILURES, pool_max=pool_max))
