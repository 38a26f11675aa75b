"""Python cost of one client login (startup, SCRAM, greeting, goodbye), without sockets.

Drives a real ClientConnection through in-memory transports on the pooler's event loop
(uvloop when installed): StartupMessage, the SCRAM-SHA-256 exchange against a stored
verifier, the greeting, and the connection's end. The client's side of SCRAM is timed
apart and subtracted, so what remains is the pooler's share of a connection's CPU
(accept, syscalls and the event loop's socket work come on top). Run:

    python -m bench.login_micro [--logins N]

PG_DOORMAN_IMPL=python|compiled picks the implementation measured (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import statistics
import time

from pg_doorman import implementation
from pg_doorman.app.event_loop import new_event_loop
from pg_doorman.app.pooler import Pooler
from pg_doorman.auth.scram import ScramClientSession, ScramVerifier, make_scram_verifier
from pg_doorman.config import parse_config
from pg_doorman.net.client import ClientConnection
from pg_doorman.protocol import messages

from .relay_micro import SERVER_PARAMETERS, MemoryTransport

PASSWORD = "bench"
_STARTUP = messages.startup_message({"user": "bench", "database": "bench"})


def _last_message(transport: MemoryTransport) -> tuple[bytes, bytes]:
    """Type and body of the last message the pooler wrote."""
    data = b"".join(transport.written)
    pos, last = 0, (b"", b"")
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        last = (data[pos : pos + 1], data[pos + 5 : pos + 1 + length])
        pos += 1 + length
    return last


async def _settle(transport: MemoryTransport, before: int) -> tuple[bytes, bytes]:
    """The pooler's answer to what it was given when `before` writes had been made,
    once it is there (the login may answer at once or a loop turn later)."""
    for _ in range(20):
        if len(transport.written) > before:
            break
        await asyncio.sleep(0)
    return _last_message(transport)


async def run(logins: int) -> list[float]:
    loop = asyncio.get_running_loop()
    verifier_text = make_scram_verifier(PASSWORD)
    verifier = ScramVerifier.parse(verifier_text)
    config = parse_config(
        {
            "general": {
                "host": "127.0.0.1",
                "port": 1,
                "pg_hba": "host all all 127.0.0.1/32 scram-sha-256",
                "log_client_connections": False,
                "log_client_disconnections": False,
            },
            "pools": {
                "bench": {
                    "users": [{"username": "bench", "password": verifier_text, "pool_size": 1}]
                }
            },
        }
    )
    pooler = Pooler(config, loop)
    entry = pooler.pool_entry("bench", "bench")
    assert entry is not None
    entry.pool.server_parameters = dict(SERVER_PARAMETERS)
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), verifier.salt, verifier.iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")

    timings = []
    batch = 200
    for _ in range(max(logins // batch, 1)):
        client_side = 0.0
        started = time.perf_counter()
        for _ in range(batch):
            client = ClientConnection(pooler)
            transport = MemoryTransport()
            client.connection_made(transport)  # type: ignore[arg-type]
            client.data_received(_STARTUP)
            kind, _ = await _settle(transport, 0)
            assert kind == b"R", kind
            mark = time.perf_counter()
            scram = ScramClientSession(client_key=client_key, server_key=verifier.server_key)
            first = scram.client_first()
            initial = messages.sasl_initial_response("SCRAM-SHA-256", first)
            client_side += time.perf_counter() - mark
            before = len(transport.written)
            client.data_received(initial)
            kind, body = await _settle(transport, before)
            assert kind == b"R", kind
            mark = time.perf_counter()
            final = messages.password_message(scram.handle_server_first(body[4:]))
            client_side += time.perf_counter() - mark
            before = len(transport.written)
            client.data_received(final)
            kind, _ = await _settle(transport, before)
            assert kind == b"Z", (kind, transport.written)
            client.data_received(messages.TERMINATE)
            transport.close()
            client.connection_lost(None)
        timings.append((time.perf_counter() - started - client_side) / batch * 1e6)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=20_000)
    args = parser.parse_args()
    loop = new_event_loop()  # the pooler's own choice: uvloop when installed
    try:
        timings = loop.run_until_complete(run(args.logins))
    finally:
        loop.close()
    print(
        f"login: {statistics.median(timings):.1f} µs of Python per SCRAM login "
        f"(median of {len(timings)} batches of 200; best {min(timings):.1f}; "
        f"{implementation.describe()})"
    )


if __name__ == "__main__":
    main()
