"""`pg_doorman demo`: a throw-away PostgreSQL with the pooler in front of it.

The demo database matches the sample `pg_doorman.toml` in the repository: database
`demo`, role `doorman` with password `doorman`, PostgreSQL on 127.0.0.1:55432 and the
pooler on 127.0.0.1:6432.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pg_doorman.app.logsetup import setup_logging

logger = logging.getLogger("pg_doorman.demo")

DEMO_USER = "doorman"
DEMO_PASSWORD = "doorman"
DEMO_DATABASE = "demo"
# The verifier PostgreSQL stores for DEMO_PASSWORD, with a fixed salt so that the
# sample config can carry the same string: SCRAM passthrough needs both to agree.
DEMO_SALT = b"pg_doorman-demo!"
DEMO_ITERATIONS = 4096


def demo_verifier() -> str:
    from pg_doorman.auth.scram import make_scram_verifier

    return make_scram_verifier(DEMO_PASSWORD, salt=DEMO_SALT, iterations=DEMO_ITERATIONS)


def demo_config(port: int = 6432, pg_port: int = 55432) -> dict[str, Any]:
    """The configuration the demo runs with, as a parsed TOML mapping."""
    return {
        "general": {
            "host": "127.0.0.1",
            "port": port,
            "admin_username": "admin",
            "admin_password": "admin",
            "pg_hba": (
                "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
            ),
        },
        "pools": {
            DEMO_DATABASE: {
                "server_host": "127.0.0.1",
                "server_port": pg_port,
                "pool_mode": "transaction",
                "users": [
                    {
                        "username": DEMO_USER,
                        "password": demo_verifier(),
                        "pool_size": 20,
                    }
                ],
            }
        },
    }


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def demo_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pg_doorman demo",
        description="Start an embedded PostgreSQL with pg_doorman in front; Ctrl-C stops both.",
    )
    parser.add_argument("--port", type=int, default=6432, help="pooler port (default 6432)")
    parser.add_argument(
        "--pg-port", type=int, default=55432, help="PostgreSQL port (default 55432)"
    )
    parser.add_argument("-l", "--log-level", default="info")
    args = parser.parse_args(list(argv))
    setup_logging(args.log_level)

    from pg_doorman.app.cli import run_loop, serve
    from pg_doorman.app.embedded_pg import LocalPostgres, PostgresNotAvailable, find_pg_bin
    from pg_doorman.config import parse_config

    try:
        bin_dir = find_pg_bin()
    except PostgresNotAvailable as exc:
        print(f"pg_doorman demo: {exc}", file=sys.stderr)
        return 1
    for port, flag in ((args.port, "--port"), (args.pg_port, "--pg-port")):
        if not _port_free(port):
            print(
                f"pg_doorman demo: port {port} is in use; pick another with {flag}",
                file=sys.stderr,
            )
            return 1

    workdir = Path(tempfile.mkdtemp(prefix="pg_doorman-demo-"))
    pg = LocalPostgres(
        workdir / "data",
        port=args.pg_port,
        bin_dir=bin_dir,
        hba_lines=(
            "local all all trust",
            "host all postgres 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host all all ::1/128 scram-sha-256",
        ),
    )
    try:
        print(f"pg_doorman demo: starting PostgreSQL on 127.0.0.1:{args.pg_port} ...", flush=True)
        pg.init()
        pg.start()
        pg.create_role(DEMO_USER, password=demo_verifier())
        pg.create_database(DEMO_DATABASE, owner=DEMO_USER)
        config = parse_config(demo_config(args.port, args.pg_port), source="demo")
        url = f"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{args.port}/{DEMO_DATABASE}"

        def ready() -> None:
            print(
                f"\npg_doorman demo is ready. Connect with:\n\n    psql '{url}'\n\n"
                "Press Ctrl-C to stop.\n",
                flush=True,
            )

        return run_loop(lambda: serve(config, ready=ready))
    except KeyboardInterrupt:
        return 0
    finally:
        print("pg_doorman demo: stopping PostgreSQL", flush=True)
        try:
            pg.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
