"""The storage interface itself, the same tests on every implementation.

The reply log (``nodes.replies``) on memory, SQLite and PostgreSQL; the ledger
and trust database rules that replicas rely on, with two separate connections
(two replicas) racing on one database; foreign errors arriving typed.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from nodes.ledger import Ledger, LedgerConflict, LedgerError, LedgerUnavailable, PaymentRecord, ledger_at
from nodes.replies import ANSWERED, BUSY, LEASE_MS, NEW, MemoryReplies, Replies
from nodes.sql import parse_db_url
from nodes.trust_db import NonceUsed, TrustDbUnavailable, trust_db_at
from protocol.errors import ConfigError
from tests.storage import PG_TEST, drop_schemas, pg_url, provisioned_on

DEV, SHOP = "dev-0001", "shop-1"
PAYER = f"{DEV}:wallet"
T0 = 1_700_000_000_000


@pytest.fixture
async def ledgers(tmp_path: Path, db_url: str | None) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two ledgers on one database, each with its own connection: two replicas."""
    dep = provisioned_on(tmp_path, db_url)
    pair = (ledger_at(dep.database("ledger")), ledger_at(dep.database("ledger")))
    try:
        for ledger in pair:
            await ledger.open()
        await pair[0].seed(dep.load_manifest())
        yield pair
    finally:
        for ledger in pair:
            await ledger.close()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def replies(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Replies, Replies]]:
    """Two views of one reply log: the same object in memory, two connections to a database."""
    if request.param == "memory":
        shared = MemoryReplies()
        yield shared, shared
        return
    prefix = f"t{secrets.token_hex(6)}"
    url = str(tmp_path / "ledger.sqlite") if request.param == "sqlite" else pg_url(prefix)
    pair = (ledger_at(url), ledger_at(url))
    try:
        for ledger in pair:
            await ledger.open()
        yield pair[0].replies, pair[1].replies
    finally:
        for ledger in pair:
            await ledger.close()
        if request.param == "postgresql":
            await drop_schemas(prefix)


# -- the reply log contract ------------------------------------------------------------


async def test_a_request_is_claimed_once_then_answered_with_the_stored_frame(
    replies: tuple[Replies, Replies],
) -> None:
    a, b = replies
    assert (await a.claim("dev-0001.chip", b"m1", "ps-a", T0)).state == NEW
    assert (await b.claim("dev-0001.chip", b"m1", "ps-b", T0 + 1)).state == BUSY
    await a.answer("dev-0001.chip", b"m1", "trustpay/v1/x/y", b"frame-1", T0 + 2)
    again = await b.claim("dev-0001.chip", b"m1", "ps-b", T0 + LEASE_MS * 5)
    assert (again.state, again.topic, again.frame) == (ANSWERED, "trustpay/v1/x/y", b"frame-1")


async def test_a_claim_held_past_the_lease_without_an_answer_is_taken_over(
    replies: tuple[Replies, Replies],
) -> None:
    a, b = replies
    assert (await a.claim("s", b"m", "ps-a", T0)).state == NEW
    assert (await b.claim("s", b"m", "ps-b", T0 + LEASE_MS - 1)).state == BUSY
    assert (await b.claim("s", b"m", "ps-b", T0 + LEASE_MS)).state == NEW
    assert (await a.claim("s", b"m", "ps-a", T0 + LEASE_MS + 1)).state == BUSY  # b holds it now


async def test_one_senders_message_id_is_not_anothers(replies: tuple[Replies, Replies]) -> None:
    a, b = replies
    assert (await a.claim("dev-0001.chip", b"m", "ps-a", T0)).state == NEW
    await a.answer("dev-0001.chip", b"m", "t", b"for dev-0001", T0)
    claim = await b.claim("dev-0002.chip", b"m", "ps-b", T0)
    assert claim.state == NEW and claim.frame == b""


async def test_prune_forgets_old_claims_within_its_limit(replies: tuple[Replies, Replies]) -> None:
    a, b = replies
    for i in range(3):
        await a.claim("s", b"old-%d" % i, "ps-a", T0 + i)
    await a.claim("s", b"new", "ps-a", T0 + 100)
    assert await b.prune(T0 + 50, 2) == 2
    assert await b.prune(T0 + 50, 2) == 1
    assert await b.prune(T0 + 50, 2) == 0
    assert (await b.claim("s", b"new", "ps-b", T0 + 101)).state == BUSY  # the young one stayed
    assert (await b.claim("s", b"old-0", "ps-b", T0 + 101)).state == NEW  # forgotten: a fresh request


async def test_two_replicas_racing_for_a_request_never_both_win(replies: tuple[Replies, Replies]) -> None:
    a, b = replies
    ids = [b"race-%d" % i for i in range(20)]
    results = await asyncio.gather(
        *(
            r.claim("dev-0001.chip", mid, holder, T0)
            for mid in ids
            for r, holder in ((a, "ps-a"), (b, "ps-b"))
        )
    )
    for i in range(0, len(results), 2):
        assert sorted(c.state for c in results[i : i + 2]) == [BUSY, NEW]


# -- ledger rules with two writers -------------------------------------------------------------


async def test_two_writers_inserting_one_order_at_once_execute_it_once(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    async def pay(ledger: Ledger) -> str:
        record = PaymentRecord("o-1", DEV, "wallet", PAYER, SHOP, 700, "EUR", 1, "confirmed", "", T0)
        try:
            async with ledger.transaction() as tx:
                assert await tx.debit(PAYER, 700) is not None
                await tx.credit(SHOP, 700)
                await tx.insert_payment(record, b"h", b"order", b"receipt")
        except LedgerConflict:
            return "conflict"
        return "paid"

    outcomes = await asyncio.gather(*(pay(ledgers[i % 2]) for i in range(4)))
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "paid"]
    snapshot = await ledgers[1].snapshot()
    balances = {a.account: a.balance for a in snapshot.accounts}
    assert (balances[PAYER], balances[SHOP]) == (100_000 - 700, 700)
    assert [p.order_id for p in snapshot.payments] == ["o-1"]


async def test_the_database_refuses_a_negative_balance_even_unconditionally(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    # the CHECK is the last line: even a debit that skipped the conditional update cannot overdraw
    with pytest.raises(LedgerConflict):
        async with ledgers[0].transaction() as tx:
            await tx.credit(PAYER, -100_001)
    assert {a.account: a.balance for a in (await ledgers[1].snapshot()).accounts}[PAYER] == 100_000


async def test_a_grant_is_consumed_once_by_concurrent_writers(ledgers: tuple[Ledger, Ledger]) -> None:
    await ledgers[0].store_grant(DEV, b"intent", b"verdict", T0 + 60_000)

    async def use(ledger: Ledger) -> bool:
        async with ledger.transaction() as tx:
            return await tx.use_grant(b"intent", T0)

    assert sorted(await asyncio.gather(*(use(ledgers[i % 2]) for i in range(4)))) == [
        False,
        False,
        False,
        True,
    ]
    await ledgers[1].store_grant(DEV, b"intent", b"verdict", T0 + 120_000)  # never revives a used grant
    async with ledgers[1].transaction() as tx:
        grant = await tx.grant(DEV, b"intent")
    assert grant is not None and grant.used_ms == T0 and grant.expires_ms == T0 + 60_000


async def test_a_counter_only_moves_up(ledgers: tuple[Ledger, Ledger]) -> None:
    async with ledgers[0].transaction() as tx:
        assert await tx.advance_counter(DEV, "wallet", 5)
        assert not await tx.advance_counter(DEV, "wallet", 5)
        assert not await tx.advance_counter(DEV, "wallet", 4)
        assert await tx.advance_counter(DEV, "wallet", 6)
    async with ledgers[1].transaction() as tx:
        assert await tx.last_counter(DEV, "wallet") == 6


async def test_a_nonce_is_consumed_by_exactly_one_of_two_replicas(tmp_path: Path, db_url: str | None) -> None:
    dep = provisioned_on(tmp_path, db_url)
    dbs = (trust_db_at(dep.database("trust")), trust_db_at(dep.database("trust")))
    try:
        for db in dbs:
            await db.open()
        await dbs[0].seed([(DEV, f"{DEV}.tm")], [], T0)
        await dbs[0].issue_nonce(b"n" * 32, DEV, b"intent", T0, T0 + 30_000)

        async def consume(i: int) -> str:
            try:
                await dbs[i % 2].consume_nonce(b"n" * 32, DEV, T0 + 1)
            except NonceUsed:
                return "used"
            return "won"

        assert sorted(await asyncio.gather(*(consume(i) for i in range(6)))) == ["used"] * 5 + ["won"]
    finally:
        for db in dbs:
            await db.close()


# -- errors arrive typed -----------------------------------------------------------------------


async def test_an_unreachable_postgresql_is_a_typed_error() -> None:
    with pytest.raises(LedgerUnavailable) as info:
        await ledger_at("postgresql://postgres@127.0.0.1:1/test").open()
    assert info.value.code == "ledger_unavailable" and isinstance(info.value.__cause__, OSError)
    with pytest.raises(TrustDbUnavailable):
        await trust_db_at("postgresql://postgres@127.0.0.1:1/test").open()


async def test_a_sqlite_path_that_cannot_be_created_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LedgerUnavailable):
        await ledger_at(tmp_path / "file" / "ledger.sqlite").open()


async def test_a_schema_of_another_version_is_refused(tmp_path: Path, db_url: str | None) -> None:
    dep = provisioned_on(tmp_path, db_url)
    ledger = ledger_at(dep.database("ledger"))
    await ledger.open()
    await ledger.close()
    where = dep.database("ledger")
    if where.path is not None:
        import sqlite3

        with sqlite3.connect(where.path) as conn:
            conn.execute("PRAGMA user_version = 99")
        conn.close()
    else:
        conn = await asyncpg.connect(PG_TEST)
        try:
            await conn.execute(f'UPDATE "{where.schema("ledger")}".schema_version SET version = 99')
        finally:
            await conn.close()
    with pytest.raises(ConfigError, match="99"):
        await ledger_at(where).open()


def test_database_urls_choose_the_implementation_and_a_safe_schema_prefix(tmp_path: Path) -> None:
    pg = parse_db_url("postgresql://u:secret@db:5433/tp?trustpay_schema=blue&sslmode=require")
    assert (pg.kind, pg.prefix, pg.schema("ledger")) == ("postgresql", "blue", "blue_ledger")
    assert pg.dsn == "postgresql://u:secret@db:5433/tp?sslmode=require"  # our parameter is ours only
    assert str(pg) == "postgresql://u@db:5433/tp?trustpay_schema=blue"  # what screens show: no password
    assert parse_db_url("postgres://db/tp").prefix == "trustpay"
    assert parse_db_url("sqlite:///var/tp/ledger.sqlite").path == Path("/var/tp/ledger.sqlite")
    assert parse_db_url("platform/ledger.sqlite", base=tmp_path).path == tmp_path / "platform/ledger.sqlite"
    for bad in ("mysql://db/tp", "postgresql://db/tp?trustpay_schema=x;drop", "sqlite://"):
        with pytest.raises(ConfigError):
            parse_db_url(bad)


async def test_replicas_starting_together_create_the_schema_once(tmp_path: Path, db_url: str | None) -> None:
    dep = provisioned_on(tmp_path, db_url)
    stores = [ledger_at(dep.database("ledger")) for _ in range(3)]
    trusts = [trust_db_at(dep.database("trust")) for _ in range(3)]
    try:
        await asyncio.gather(*(s.open() for s in (*stores, *trusts)))
        await asyncio.gather(*(s.seed(dep.load_manifest()) for s in stores))
        accounts = (await stores[2].snapshot()).accounts
    finally:
        await asyncio.gather(*(s.close() for s in (*stores, *trusts)))
    assert len(accounts) == len({a.account for a in accounts}) == 2 + 3  # two payers, three merchants


async def test_replicas_opening_one_new_sqlite_file_at_once_never_find_it_locked(tmp_path: Path) -> None:
    # switching a new file to WAL fails at once, without a busy wait, while another connection
    # sets the file up: two replicas starting together failed one time in 25 before the retry
    for attempt in range(150):
        ledgers = [ledger_at(tmp_path / f"ledger-{attempt}.sqlite") for _ in range(3)]
        trusts = [trust_db_at(tmp_path / f"trust-{attempt}.sqlite") for _ in range(3)]
        try:
            await asyncio.gather(*(s.open() for s in (*ledgers, *trusts)))
        finally:
            await asyncio.gather(*(s.close() for s in (*ledgers, *trusts)))


async def test_a_reader_cannot_write(tmp_path: Path, db_url: str | None) -> None:
    # what `trustpay ledger` opens: a slip in a reader must not move money beside the servers
    dep = provisioned_on(tmp_path, db_url)
    writer = ledger_at(dep.database("ledger"))
    await writer.open()
    await writer.seed(dep.load_manifest())
    await writer.close()
    reader = ledger_at(dep.database("ledger"), readonly=True)
    await reader.open()
    try:
        with pytest.raises(LedgerError):
            async with reader.transaction() as tx:
                await tx.credit(SHOP, 1)
        assert {a.account: a.balance for a in (await reader.snapshot()).accounts}[SHOP] == 0
    finally:
        await reader.close()
