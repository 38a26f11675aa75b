"""How a client must authenticate: pg_hba's verdict combined with the stored password."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pg_doorman.auth.hba import HbaRule
from pg_doorman.auth.md5 import is_md5_hash
from pg_doorman.auth.scram import is_scram_verifier


class ClientAuth(enum.Enum):
    TRUST = "trust"
    MD5 = "md5"
    SCRAM = "scram-sha-256"
    REJECT = "reject"


@dataclass(frozen=True)
class AuthDecision:
    method: ClientAuth
    reason: str = ""
    # True when refused by pg_hba itself (28000); False for password problems (28P01).
    by_hba: bool = False


def _by_password(stored: str) -> AuthDecision:
    if is_scram_verifier(stored):
        return AuthDecision(ClientAuth.SCRAM)
    if is_md5_hash(stored):
        return AuthDecision(ClientAuth.MD5)
    if not stored:
        return AuthDecision(ClientAuth.REJECT, "no password is configured for this user")
    return AuthDecision(
        ClientAuth.REJECT, "the configured password is neither an md5 hash nor a SCRAM verifier"
    )


def decide_client_auth(
    rule: HbaRule | None, hba_configured: bool, stored_password: str
) -> AuthDecision:
    if not hba_configured:
        return _by_password(stored_password)
    if rule is None:
        return AuthDecision(ClientAuth.REJECT, "no pg_hba entry matches", by_hba=True)
    if rule.method == "trust":
        return AuthDecision(ClientAuth.TRUST)
    if rule.method == "reject":
        return AuthDecision(
            ClientAuth.REJECT, f"pg_hba line {rule.line_no} rejects the connection", by_hba=True
        )
    decision = _by_password(stored_password)
    if rule.method == "scram-sha-256" and decision.method == ClientAuth.MD5:
        # PostgreSQL: an md5 hash can't answer a SCRAM exchange.
        return AuthDecision(
            ClientAuth.REJECT,
            f"pg_hba line {rule.line_no} requires scram-sha-256 but the stored password is "
            "an md5 hash",
        )
    # md5 and password rules accept both: a SCRAM verifier upgrades the exchange.
    return decision
