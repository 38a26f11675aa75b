"""Cancelling a running query the way a driver does: a CancelRequest with the key the
connection got at login, sent from another thread while the query runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest


def cancel_midway(conn: psycopg.Connection[Any], seconds: int = 20) -> float:
    """Run `select pg_sleep(seconds)` on `conn`, cancel it half a second in with the
    connection's key, and require it to end with QueryCanceled. Returns how long the
    query ran (the caller bounds it: a lost cancel lets it run its full time)."""
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"select pg_sleep({int(seconds)})")
    finally:
        timer.cancel()
        timer.join()
    return time.monotonic() - started
