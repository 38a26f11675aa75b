"""pg_hba through a running pooler: IPv4 clients of a dual-stack listener, rule text
that is empty or holds a quoted regular expression, and reloads that replace the
rules while earlier verdicts are remembered."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory


def _bindv6only() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "1"
    except OSError:
        return False


def _login_error(host: str, port: int, user: str, password: str | None) -> str | None:
    """The SQLSTATE a login is refused with, or None when it succeeds."""
    try:
        w.PgWire.connect(host, port, user, EXAMPLE_DB, password).close()
    except w.ServerError as exc:
        return exc.sqlstate
    return None


@pytest.mark.skipif(not socket.has_ipv6 or _bindv6only(), reason="needs a dual-stack IPv6 listener")
def test_an_ipv4_client_of_a_dual_stack_listener_is_judged_by_ipv4_lines(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """host = "::" takes IPv4 clients as ::ffff:a.b.c.d. As in PostgreSQL they match
    IPv4 lines only: a `::/0 trust` line meant for IPv6 clients lets none of them in."""
    user = pg.md5_user
    hba = "host all all ::/0 trust\nhost all all 127.0.0.1/32 md5\n"
    proc = pooler(general={"host": "::", "pg_hba": hba})
    # Over IPv4 the md5 line decides: a wrong password is refused, the right one not ...
    assert _login_error("127.0.0.1", proc.port, user.name, "wrong") == "28P01"
    dsn = f"host=127.0.0.1 port={proc.port} dbname={EXAMPLE_DB} user={user.name}"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn, password="wrong").close()
    with psycopg.connect(dsn, password=user.password, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # ... while an IPv6 client is trusted by the IPv6 line.
    assert _login_error("::1", proc.port, user.name, None) is None


def test_a_reload_to_empty_rule_text_is_refused(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """allow -> reject applies to the very next login although the allow verdict was
    remembered; a reload to empty rule text then fails and the reject line stays
    (it used to drop pg_hba altogether and let every address in)."""
    user = pg.md5_user
    proc = pooler(general={"pg_hba": "host all all 127.0.0.1/32 md5\n"})
    for _ in range(2):  # the second login's verdict is the remembered one
        assert _login_error(proc.host, proc.port, user.name, user.password) is None
    proc.config["general"]["pg_hba"] = f"host all {user.name} 127.0.0.1/32 reject\n"
    proc.reload_and_wait(proc.config)
    assert _login_error(proc.host, proc.port, user.name, user.password) == "28000"
    proc.config["general"]["pg_hba"] = ""
    proc.reload(proc.config)
    proc.wait_for_log("reload failed")
    assert "general.pg_hba" in proc.log_text()
    assert _login_error(proc.host, proc.port, user.name, user.password) == "28000"


@pytest.mark.parametrize(
    "rules",
    [
        "",  # an empty pg_hba file
        '# the regular expression is quoted because of its comma\nhost "/^(example_db,other)$" '
        "all 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 md5\n",
    ],
    ids=["empty-file", "quoted-regex"],
)
def test_rule_files_the_pooler_cannot_honour_stop_it_from_starting(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path, rules: str
) -> None:
    """Either file used to start a pooler that let example_db's users in: the empty one
    by turning pg_hba off, the regular expression (a reject line in PostgreSQL 16+)
    by matching only a database literally named like it."""
    hba_file = tmp_path / "pg_hba.conf"
    hba_file.write_text(rules)
    proc = pooler(start=False, general={"pg_hba": {"path": str(hba_file)}})
    proc.spawn()
    assert proc.wait_exit() == 2
    assert "general.pg_hba: " in proc.log_text()
