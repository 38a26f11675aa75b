"""SCRAM keys derived from a password away from the event loop.

PBKDF2 runs as many rounds as the server's iteration count says: 4096 by default, but
PostgreSQL accepts up to 2^31-1, and at a million a derivation takes a fraction of a
second, at a hundred million half a minute. On the event loop that would stall every
client of the process, so a derivation not cached yet runs in a thread of its own
(hashlib's PBKDF2 lets other threads run meanwhile). Logins that need the same keys at
the same time wait for one computation, and its result is cached even when every login
that asked for it has given up (a connect timeout): the next attempt finds it there.

The threads are daemons, started per derivation, as PAM checks are (auth/pam.py): a
derivation of hours can't hold up the pooler's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import threading

from pg_doorman.auth.scram import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_LENGTH,
    KeyDerivation,
    ScramVerifier,
    cached_keys,
    remember_keys,
)

_Keys = tuple[bytes, bytes]

# Per loop: a future belongs to the loop that made it.
_running: dict[tuple[asyncio.AbstractEventLoop, KeyDerivation], asyncio.Future[_Keys]] = {}


async def derive_keys(derivation: KeyDerivation) -> _Keys:
    """(ClientKey, ServerKey) of `derivation`: from the cache, or computed in a thread."""
    keys = cached_keys(derivation)
    if keys is not None:
        return keys
    loop = asyncio.get_running_loop()
    future = _running.get((loop, derivation))
    if future is None:
        future = loop.create_future()
        _running[(loop, derivation)] = future
        threading.Thread(
            target=_compute, args=(loop, derivation, future), name="scram-keys", daemon=True
        ).start()
    # Shielded: a login that gives up must not cancel what others wait for.
    return await asyncio.shield(future)


def _compute(
    loop: asyncio.AbstractEventLoop, derivation: KeyDerivation, future: asyncio.Future[_Keys]
) -> None:
    keys: _Keys | None = None
    error: Exception | None = None
    try:
        keys = derivation.run()
    except Exception as exc:
        error = exc
    with contextlib.suppress(RuntimeError):  # the loop is closed: no one waits
        loop.call_soon_threadsafe(_settle, loop, derivation, future, keys, error)


def _settle(
    loop: asyncio.AbstractEventLoop,
    derivation: KeyDerivation,
    future: asyncio.Future[_Keys],
    keys: _Keys | None,
    error: Exception | None,
) -> None:
    del _running[(loop, derivation)]
    if keys is not None:
        remember_keys(derivation, keys)
        future.set_result(keys)
    else:
        future.set_exception(error or RuntimeError("SCRAM key derivation failed"))
        future.exception()  # those who wait see it; with no one left it is not an error


# The salt of the verifiers made here: one per process, so that a password's verifier
# is derived once (PostgreSQL too keeps one salt per role until its password changes).
_VERIFIER_SALT = secrets.token_bytes(DEFAULT_SALT_LENGTH)


async def verifier_of(password: str) -> ScramVerifier:
    """A SCRAM verifier of a plaintext password the pooler checks clients against (the
    admin console's): derived once per process, away from the loop."""
    client_key, server_key = await derive_keys(
        KeyDerivation(password, _VERIFIER_SALT, DEFAULT_ITERATIONS)
    )
    stored_key = hashlib.sha256(client_key).digest()
    return ScramVerifier(DEFAULT_ITERATIONS, _VERIFIER_SALT, stored_key, server_key)
