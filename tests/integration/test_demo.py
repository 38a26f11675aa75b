"""`pg_doorman demo`: one command gives a working pooler in front of a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from pg_doorman.app.embedded_pg import free_port

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_demo_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, pg_port = free_port(), free_port()
    log = (tmp_path / "demo.log").open("w+")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pg_doorman",
            "demo",
            "--port",
            str(port),
            "--pg-port",
            str(pg_port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"postgresql://doorman:doorman@127.0.0.1:{port}/demo"
        deadline = time.monotonic() + 60
        while f"psql '{url}'" not in (tmp_path / "demo.log").read_text():
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            assert time.monotonic() < deadline, "demo did not become ready"
            time.sleep(0.2)
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("select current_user, current_database()").fetchone() == (
                "doorman",
                "demo",
            )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "demo.log").read_text()
    assert "stopping PostgreSQL" in text
    # PostgreSQL is gone too: its port no longer accepts connections.
    import socket

    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", pg_port)) != 0
