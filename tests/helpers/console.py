"""The admin console, spoken to with the raw protocol client."""

from __future__ import annotations

from . import pgwire as w
from .pooler import PoolerProcess


def admin_console(proc: PoolerProcess, database: str = "pgdoorman") -> w.PgWire:
    return w.PgWire.connect(proc.host, proc.port, "admin", database, "admin")


def show_table(console: w.PgWire, what: str) -> list[dict[str, str | None]]:
    """The rows of `SHOW <what>`, by column name."""
    got = console.simple_query(f"SHOW {what}")
    error = w.first_error(got)
    assert error is None, error
    columns = next(w.row_description(p) for t, p in got if t == b"T")
    return [dict(zip(columns, row, strict=True)) for row in w.rows(got)]


def pool_row(console: w.PgWire, user: str) -> dict[str, str | None]:
    """SHOW POOLS' row for a user's pool."""
    return next(r for r in show_table(console, "POOLS") if r["user"] == user)


def admin_rows(proc: PoolerProcess, what: str) -> list[dict[str, str | None]]:
    """`SHOW <what>` over a fresh admin console connection (plain TCP)."""
    console = admin_console(proc)
    try:
        return show_table(console, what)
    finally:
        console.close()
