"""The two storage back ends, for tests that must hold on both.

``db_url`` is parametrized: ``None`` (the deployment's default SQLite files)
and a PostgreSQL URL on the shared ``test`` database with a schema prefix of
its own, so parallel workers never see each other's tables; the schemas are
dropped when the test ends. ``tests/conftest.py`` offers the fixture to every test.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from nodes.deployment import Deployment

PG_TEST = "postgresql://postgres@127.0.0.1:5432/test"
ROLES = ("ledger", "trust")


def pg_url(prefix: str) -> str:
    return f"{PG_TEST}?trustpay_schema={prefix}"


async def drop_schemas(prefix: str) -> None:
    conn = await asyncpg.connect(PG_TEST)
    try:
        for role in ROLES:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}_{role}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """None: SQLite, the deployment's default; else a fresh PostgreSQL schema prefix, dropped after."""
    if request.param == "sqlite":
        yield None
        return
    prefix = f"t{secrets.token_hex(6)}"
    try:
        yield pg_url(prefix)
    finally:
        await drop_schemas(prefix)


def provisioned_on(tmp_path: Path, db: str | None, devices: int = 1) -> Deployment:
    """A provisioned deployment whose servers keep their state at ``db`` (None: SQLite files)."""
    from ops.provision import provision

    out = tmp_path / "deploy"
    provision(out, devices, broker_port=1, backend="amqtt", db=db)
    return Deployment(out)
