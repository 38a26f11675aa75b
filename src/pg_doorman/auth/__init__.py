"""Authentication: md5 and SCRAM-SHA-256 math, pg_hba rules, and the decision between them.

Everything here is sans-IO: functions and small state machines over bytes and str.
"""

from pg_doorman.auth.hba import (
    HbaError,
    HbaRule,
    HbaRules,
    legacy_hba_allows,
    parse_legacy_hba,
)
from pg_doorman.auth.md5 import (
    is_md5_hash,
    md5_password_hash,
    md5_password_response,
    md5_salted_response,
    verify_md5_response,
)
from pg_doorman.auth.methods import AuthDecision, ClientAuth, decide_client_auth
from pg_doorman.auth.scram import (
    AuthenticationFailed,
    ScramClientSession,
    ScramError,
    ScramServerSession,
    ScramVerifier,
    is_scram_verifier,
    make_scram_verifier,
)

__all__ = [
    "AuthDecision",
    "AuthenticationFailed",
    "ClientAuth",
    "HbaError",
    "HbaRule",
    "HbaRules",
    "ScramClientSession",
    "ScramError",
    "ScramServerSession",
    "ScramVerifier",
    "decide_client_auth",
    "is_md5_hash",
    "is_scram_verifier",
    "legacy_hba_allows",
    "make_scram_verifier",
    "md5_password_hash",
    "md5_password_response",
    "md5_salted_response",
    "parse_legacy_hba",
    "verify_md5_response",
]
