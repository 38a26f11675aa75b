"""SCRAM keys derived from a password: cached, and away from the event loop on a miss."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator

import pytest

from pg_doorman.auth import key_derivation, scram
from pg_doorman.auth.key_derivation import derive_keys, verifier_of
from pg_doorman.auth.scram import (
    KeyDerivation,
    ScramClientSession,
    ScramError,
    ScramServerSession,
    ScramVerifier,
    make_scram_verifier,
)

RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_SERVER_FIRST = (
    f"r={RFC_CLIENT_NONCE}%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
).encode()
RFC_CLIENT_FINAL = (
    f"c=biws,r={RFC_CLIENT_NONCE}%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
).encode()
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


@pytest.fixture(autouse=True)
def _empty_key_cache() -> Iterator[None]:
    scram._derived_keys.clear()
    yield
    scram._derived_keys.clear()


def rfc_client() -> ScramClientSession:
    return ScramClientSession(password="pencil", nonce=RFC_CLIENT_NONCE, username="user")


class GatedRuns:
    """The derivation thread's work, counted and held back until `gate` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        compute = key_derivation._compute

        def gated(
            loop: asyncio.AbstractEventLoop,
            derivation: KeyDerivation,
            future: asyncio.Future[tuple[bytes, bytes]],
        ) -> None:
            self.calls += 1
            self.started.set()
            assert self.gate.wait(30)
            compute(loop, derivation, future)

        monkeypatch.setattr(key_derivation, "_compute", gated)


def test_a_cache_miss_asks_for_the_derivation_and_a_hit_answers_at_once() -> None:
    client = rfc_client()
    derivation = client.read_server_first(RFC_SERVER_FIRST)
    assert derivation == KeyDerivation("pencil", RFC_SALT, 4096)
    with pytest.raises(ScramError):
        client.client_final()  # no keys yet
    client.use_keys(derivation.run())
    assert client.client_final() == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL)

    scram.remember_keys(derivation, derivation.run())
    again = rfc_client()
    assert again.read_server_first(RFC_SERVER_FIRST) is None
    assert again.client_final() == RFC_CLIENT_FINAL


def test_passthrough_needs_no_derivation() -> None:
    verifier = ScramVerifier.parse(make_scram_verifier("pencil", salt=RFC_SALT))
    client_key, _ = KeyDerivation("pencil", RFC_SALT, 4096).run()
    relay = ScramClientSession(
        client_key=client_key,
        server_key=verifier.server_key,
        nonce=RFC_CLIENT_NONCE,
        username="user",
    )
    assert relay.read_server_first(RFC_SERVER_FIRST) is None
    assert relay.client_final() == RFC_CLIENT_FINAL


def test_handle_server_first_computes_and_caches_in_place() -> None:
    assert rfc_client().handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert scram.cached_keys(KeyDerivation("pencil", RFC_SALT, 4096)) is not None


def test_verifiers_with_random_salts_stay_out_of_the_cache() -> None:
    for _ in range(3):
        make_scram_verifier("pencil")
    assert scram._derived_keys == {}


def test_the_cache_drops_the_least_recently_used() -> None:
    keys = (b"c" * 32, b"s" * 32)
    first, second, *others = (KeyDerivation("p", i.to_bytes(2, "big"), 1) for i in range(1024))
    for derivation in (first, second, *others):
        scram.remember_keys(derivation, keys)
    assert scram.cached_keys(first) == keys  # now used more recently than `second`
    scram.remember_keys(KeyDerivation("p", b"new", 1), keys)
    assert len(scram._derived_keys) == 1024
    assert scram.cached_keys(first) == keys
    assert scram.cached_keys(second) is None


def test_concurrent_misses_share_one_computation_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = GatedRuns(monkeypatch)
    derivation = KeyDerivation("pencil", RFC_SALT, 4096)

    async def main() -> None:
        waiters = [asyncio.ensure_future(derive_keys(derivation)) for _ in range(3)]
        # The loop runs on while the derivation waits for the gate in its thread (on
        # the loop, it would wait there and nothing below would run).
        while not runs.started.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters)
        runs.gate.set()
        results = await asyncio.gather(*waiters)
        assert results[0] == results[1] == results[2] == scram.cached_keys(derivation)

    asyncio.run(main())
    assert runs.calls == 1
    assert scram.cached_keys(derivation) is not None
    assert key_derivation._running == {}


def test_a_derivation_every_login_gave_up_on_still_lands_in_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = GatedRuns(monkeypatch)
    derivation = KeyDerivation("pencil", RFC_SALT, 4096)

    async def main() -> None:
        first = asyncio.ensure_future(derive_keys(derivation))
        second = asyncio.ensure_future(derive_keys(derivation))
        while not runs.started.is_set():
            await asyncio.sleep(0.01)
        first.cancel()  # a connect timeout: the other login still gets the keys
        runs.gate.set()
        keys = await second
        assert first.cancelled()
        assert scram.cached_keys(derivation) == keys
        # Everyone gone before the end: the result is cached all the same.
        scram._derived_keys.clear()
        runs.gate.clear()
        runs.started.clear()
        lone = asyncio.ensure_future(derive_keys(derivation))
        while not runs.started.is_set():
            await asyncio.sleep(0.01)
        lone.cancel()
        runs.gate.set()
        while scram.cached_keys(derivation) is None:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert runs.calls == 2


def test_a_cache_hit_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    derivation = KeyDerivation("pencil", RFC_SALT, 4096)
    keys = derivation.run()
    scram.remember_keys(derivation, keys)
    runs = GatedRuns(monkeypatch)
    assert asyncio.run(derive_keys(derivation)) == keys
    assert runs.calls == 0


def test_the_admin_verifier_is_derived_once_and_checks_the_password() -> None:
    async def two() -> tuple[ScramVerifier, ScramVerifier]:
        return await verifier_of("admin-secret"), await verifier_of("admin-secret")

    first, second = asyncio.run(two())
    assert first == second
    server = ScramServerSession(first)
    client = ScramClientSession(password="admin-secret")
    server_first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    client.handle_server_final(server.handle_client_final(client.handle_server_first(server_first)))
