"""Where the servers' databases come from: ``provision --db``, the manifest, ``node --db``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.ledger_pg import PgLedger
from nodes.ledger_sqlite import SqliteLedger
from nodes.payment_server import PaymentServer
from nodes.trust_db_pg import PgTrustDb
from nodes.trust_server import TrustServer
from ops.cli import EXIT_CONFIG, main
from tests.nodes.harness import make_node
from tests.storage import pg_url, provisioned_on

URL = pg_url("tblue")


def test_provision_db_puts_both_servers_on_one_postgresql_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deploy"
    argv = ["provision", "--out", str(out), "--devices", "1", "--backend", "amqtt", "--broker-port", "1"]
    assert main([*argv, "--db", URL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["databases"] == {"trust": URL, "ledger": URL}
    dep = provisioned_on(tmp_path / "again", URL)
    ledger, trust = dep.database("ledger"), dep.database("trust")
    assert (ledger.schema("ledger"), trust.schema("trust")) == ("tblue_ledger", "tblue_trust")
    assert ledger.dsn == "postgresql://postgres@127.0.0.1:5432/test"


def test_provision_refuses_a_password_in_the_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the manifest is copied and read widely: a database password does not belong in it
    out = tmp_path / "deploy"
    argv = ["provision", "--out", str(out), "--devices", "1", "--backend", "amqtt", "--broker-port", "1"]
    assert main([*argv, "--db", "postgresql://postgres:hunter2@127.0.0.1/test"]) == EXIT_CONFIG
    assert "PGPASSWORD" in capsys.readouterr().err
    assert not out.exists()


def test_the_default_stays_sqlite_files_in_the_deployment(tmp_path: Path) -> None:
    dep = provisioned_on(tmp_path, None)
    ps = make_node(PaymentServer, dep, "payment-server", FakeBroker(), deployment=dep)
    assert isinstance(ps.ledger, SqliteLedger) and ps.ledger.path == dep.ledger_db
    assert dep.database("trust").path == dep.trust_db


def test_a_servers_db_option_overrides_the_manifest(tmp_path: Path) -> None:
    dep = provisioned_on(tmp_path, None)
    ps = make_node(PaymentServer, dep, "payment-server", FakeBroker(), deployment=dep, db_url=URL)
    ts = make_node(TrustServer, dep, "trust-server", FakeBroker(), deployment=dep, db_url=URL)
    assert isinstance(ps.ledger, PgLedger) and isinstance(ts.db, PgTrustDb)
    assert "tblue_ledger" in str(ps.ledger)


def test_node_db_is_for_the_servers_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dep = provisioned_on(tmp_path, None)
    assert main(["node", "chip", "--deploy", str(dep.root), "--db", URL]) == EXIT_CONFIG
    assert "--db is for the servers" in capsys.readouterr().err
