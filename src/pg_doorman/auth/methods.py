"""How a client must authenticate: pg_hba's verdict combined with the stored password.

The stored password decides what the pooler can check: an md5 hash answers only an MD5
challenge, a SCRAM verifier only a SCRAM exchange. This follows PostgreSQL: an `md5`
(or `password`) line with a SCRAM verifier runs SCRAM, a `scram-sha-256` line with an
md5 hash refuses the login.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from pg_doorman.auth.hba import HbaRule
from pg_doorman.auth.md5 import is_md5_hash
from pg_doorman.auth.scram import is_scram_verifier

# A `password` naming the RSA public key that checks the client's token (auth/jwt.py),
# and a `server_password` naming the private key that signs the pooler's own.
JWT_PUBLIC_KEY_PREFIX: Final = "jwt-pkey-fpath:"
JWT_PRIVATE_KEY_PREFIX: Final = "jwt-priv-key-fpath:"


class ClientAuth(enum.Enum):
    TRUST = "trust"
    MD5 = "md5"
    SCRAM = "scram-sha-256"
    JWT = "jwt"  # a token sent as a cleartext password
    PAM = "pam"  # a cleartext password checked by the user's auth_pam_service
    REJECT = "reject"


@dataclass(frozen=True)
class AuthDecision:
    method: ClientAuth
    # Why a REJECT: logged, or (when by_hba) sent to the client followed by the
    # caller's ' for host "...", user "...", database "..."', as PostgreSQL words it.
    reason: str = ""
    # True when pg_hba itself refused (SQLSTATE 28000, said at once); False for password
    # problems, which the client only learns as a failed password exchange (28P01).
    by_hba: bool = False
    # For a REJECT learnt through a password exchange: the exchange to fake, so that it
    # looks like a real user's (PostgreSQL's mock authentication). SCRAM, as PostgreSQL
    # fakes it for a role that does not exist or has no password under any password
    # line (its default password_encryption): an MD5 challenge would set such names
    # apart from the SCRAM users most servers have.
    mock: ClientAuth = ClientAuth.SCRAM


_PAM_DECISION: Final = AuthDecision(ClientAuth.PAM)
# The reason of a REJECT when no pg_hba line matched (any other by_hba REJECT is a
# line, or the legacy hba list, refusing the connection).
NO_HBA_ENTRY: Final = "no pg_hba entry"


def _for_user(user: str) -> str:
    return f' for user "{user}"' if user else ""


def _by_stored_password(stored: str, user: str) -> AuthDecision:
    if is_scram_verifier(stored):
        return AuthDecision(ClientAuth.SCRAM)
    if is_md5_hash(stored):
        return AuthDecision(ClientAuth.MD5)
    if stored.startswith(JWT_PUBLIC_KEY_PREFIX):
        return AuthDecision(ClientAuth.JWT)
    if not stored:
        return AuthDecision(ClientAuth.REJECT, f"password{_for_user(user)} is not set")
    return AuthDecision(
        ClientAuth.REJECT,
        f"password{_for_user(user)} is neither an md5 hash nor a SCRAM-SHA-256 verifier",
    )


def decide_client_auth(
    rule: HbaRule | None,
    hba_configured: bool,
    stored_password: str,
    *,
    user: str = "",
    pam: bool = False,
) -> AuthDecision:
    """The exchange to run with the client, or REJECT with a reason.

    `rule` is the first matching pg_hba line (None if none matched); `user` only names
    the user in reasons; `pam`: the user has an auth_pam_service, which takes the place
    of the stored password.
    """
    if not hba_configured:
        return _PAM_DECISION if pam else _by_stored_password(stored_password, user)
    if rule is None:
        return AuthDecision(ClientAuth.REJECT, NO_HBA_ENTRY, by_hba=True)
    if rule.method == "trust":
        return AuthDecision(ClientAuth.TRUST)
    if rule.method == "reject":
        return AuthDecision(
            ClientAuth.REJECT, f"rejected by pg_hba line {rule.line_no}", by_hba=True
        )
    decision = _PAM_DECISION if pam else _by_stored_password(stored_password, user)
    if rule.method == "scram-sha-256" and decision.method == ClientAuth.REJECT:
        # No usable password (or no such user): refused after a mock SCRAM exchange.
        return AuthDecision(ClientAuth.REJECT, decision.reason, mock=ClientAuth.SCRAM)
    if rule.method == "scram-sha-256" and decision.method in (
        ClientAuth.MD5,
        ClientAuth.JWT,
        ClientAuth.PAM,
    ):
        # An md5 hash can't answer a SCRAM exchange; PostgreSQL refuses too. A token or
        # a PAM password travels in clear text, which such a line does not allow either.
        if decision.method == ClientAuth.PAM:
            return AuthDecision(
                ClientAuth.REJECT,
                f"pg_hba line {rule.line_no} requires scram-sha-256 but{_for_user(user)} "
                "the password is checked by PAM, in clear text",
                mock=ClientAuth.SCRAM,
            )
        kind = "an md5 hash" if decision.method == ClientAuth.MD5 else "a JWT key"
        return AuthDecision(
            ClientAuth.REJECT,
            f"pg_hba line {rule.line_no} requires scram-sha-256 but the stored password"
            f"{_for_user(user)} is {kind}",
            mock=ClientAuth.SCRAM,
        )
    # `md5` and `password` lines take either format: a SCRAM verifier upgrades the
    # exchange to SCRAM as in PostgreSQL, and cleartext is never asked for.
    return decision
