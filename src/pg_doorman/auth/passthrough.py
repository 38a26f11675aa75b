"""What SCRAM passthrough keeps: the ClientKey recovered from a client's login, with
which the pooler logs in to PostgreSQL as that user without knowing the password."""

from __future__ import annotations

import hashlib

from pg_doorman.net.server import BackendCredentials


def keep_client_key(credentials: BackendCredentials, key: bytes | None) -> None:
    """Give `credentials` a ClientKey learnt elsewhere (by another process, or by the
    pool a reload replaced) if they have none and it fits their verifier: its SHA-256
    is the verifier's StoredKey."""
    verifier = credentials.scram_verifier
    if (
        key is not None
        and credentials.scram_client_key is None
        and verifier is not None
        and hashlib.sha256(key).digest() == verifier.stored_key
    ):
        credentials.scram_client_key = key
