"""The client authentication decision: pg_hba's verdict combined with the stored password."""

from __future__ import annotations

import ipaddress

import pytest

from pg_doorman.auth.hba import HbaRules
from pg_doorman.auth.md5 import md5_password_hash
from pg_doorman.auth.methods import AuthDecision, ClientAuth, decide_client_auth
from pg_doorman.auth.scram import make_scram_verifier

MD5 = md5_password_hash("pw", "alice")
SCRAM = make_scram_verifier("pw", salt=b"0123456789abcdef")
JWT = "jwt-pkey-fpath:/etc/pg_doorman/issuer.pem"


def rule_for(method: str, line_no: int = 1) -> HbaRules:
    text = "# padding\n" * (line_no - 1) + f"host all all 0.0.0.0/0 {method}\n"
    return HbaRules.parse(text)


def decide(method: str | None, stored: str, **kwargs: str) -> AuthDecision:
    if method is None:
        return decide_client_auth(None, False, stored, **kwargs)
    return decide_client_auth(rule_for(method).rules[0], True, stored, **kwargs)


@pytest.mark.parametrize(
    ("method", "stored", "expected"),
    [
        # No pg_hba: the stored format decides.
        (None, MD5, ClientAuth.MD5),
        (None, SCRAM, ClientAuth.SCRAM),
        (None, "", ClientAuth.REJECT),
        (None, "plaintext", ClientAuth.REJECT),
        (None, "md5" + "A" * 32, ClientAuth.REJECT),  # not a hash PostgreSQL would accept
        # trust lets anyone in, even without a stored password.
        ("trust", "", ClientAuth.TRUST),
        ("trust", MD5, ClientAuth.TRUST),
        ("trust", SCRAM, ClientAuth.TRUST),
        ("reject", MD5, ClientAuth.REJECT),
        ("reject", SCRAM, ClientAuth.REJECT),
        ("md5", MD5, ClientAuth.MD5),
        ("md5", SCRAM, ClientAuth.SCRAM),  # upgraded, as PostgreSQL does
        ("md5", "", ClientAuth.REJECT),
        ("md5", "plaintext", ClientAuth.REJECT),
        ("scram-sha-256", SCRAM, ClientAuth.SCRAM),
        ("scram-sha-256", MD5, ClientAuth.REJECT),  # an md5 hash can't answer SCRAM
        ("scram-sha-256", "", ClientAuth.REJECT),
        ("password", MD5, ClientAuth.MD5),  # never cleartext: like md5
        ("password", SCRAM, ClientAuth.SCRAM),
        ("password", "", ClientAuth.REJECT),
        # A token key: the token comes as a cleartext password.
        (None, JWT, ClientAuth.JWT),
        ("trust", JWT, ClientAuth.TRUST),
        ("md5", JWT, ClientAuth.JWT),
        ("password", JWT, ClientAuth.JWT),
        ("scram-sha-256", JWT, ClientAuth.REJECT),  # no cleartext under such a line
        ("reject", JWT, ClientAuth.REJECT),
    ],
)
def test_decision_table(method: str | None, stored: str, expected: ClientAuth) -> None:
    decision = decide(method, stored)
    assert decision.method == expected
    assert bool(decision.reason) == (expected == ClientAuth.REJECT)
    assert decision.by_hba == (method == "reject")


def test_no_matching_line_is_a_pg_hba_refusal() -> None:
    for stored in (MD5, SCRAM, ""):
        decision = decide_client_auth(None, True, stored)
        assert decision == AuthDecision(ClientAuth.REJECT, "no pg_hba entry", by_hba=True)


def test_reject_reason_names_the_line() -> None:
    decision = decide_client_auth(rule_for("reject", line_no=4).rules[0], True, SCRAM)
    assert decision.reason == "rejected by pg_hba line 4"
    assert decision.by_hba


def test_scram_line_with_md5_hash_reason() -> None:
    decision = decide_client_auth(rule_for("scram-sha-256", 2).rules[0], True, MD5, user="bob")
    assert decision.method == ClientAuth.REJECT and not decision.by_hba
    assert decision.reason == (
        'pg_hba line 2 requires scram-sha-256 but the stored password for user "bob" is an md5 hash'
    )


def test_scram_line_with_a_token_key_reason() -> None:
    decision = decide_client_auth(rule_for("scram-sha-256", 3).rules[0], True, JWT, user="bob")
    assert decision.method == ClientAuth.REJECT and not decision.by_hba
    assert decision.reason == (
        'pg_hba line 3 requires scram-sha-256 but the stored password for user "bob" is a JWT key'
    )


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (None, ClientAuth.PAM),
        ("md5", ClientAuth.PAM),
        ("password", ClientAuth.PAM),
        ("trust", ClientAuth.TRUST),
        ("reject", ClientAuth.REJECT),
        ("scram-sha-256", ClientAuth.REJECT),  # PAM takes the password in clear text
    ],
)
@pytest.mark.parametrize("stored", [MD5, SCRAM, JWT, ""])
def test_an_auth_pam_service_takes_the_place_of_the_stored_password(
    method: str | None, expected: ClientAuth, stored: str
) -> None:
    rule = rule_for(method, 2).rules[0] if method is not None else None
    decision = decide_client_auth(rule, method is not None, stored, user="bob", pam=True)
    assert decision.method == expected
    if method == "scram-sha-256":
        assert decision.reason == (
            'pg_hba line 2 requires scram-sha-256 but for user "bob" the password is checked '
            "by PAM, in clear text"
        )


@pytest.mark.parametrize("method", [None, "md5", "scram-sha-256", "password"])
def test_missing_password_reason(method: str | None) -> None:
    assert decide(method, "", user="bob").reason == 'password for user "bob" is not set'
    assert decide(method, "").reason == "password is not set"
    assert "neither an md5 hash nor a SCRAM-SHA-256 verifier" in decide(method, "hunter2").reason


def test_first_match_feeds_the_decision() -> None:
    """A reject line above a trust line decides; an md5 user under a scram line is refused."""
    rules = HbaRules.parse(
        "host all bob 10.0.0.0/8 reject\n"
        "host all carol 10.0.0.0/8 scram-sha-256\n"
        "host all all 10.0.0.0/8 trust\n"
    )

    def method_for(user: str, stored: str) -> ClientAuth:
        rule = rules.match(
            conn_type="host",
            ssl=False,
            database="app",
            user=user,
            address=ipaddress.ip_address("10.0.0.1"),
        )
        return decide_client_auth(rule, True, stored, user=user).method

    assert method_for("bob", MD5) == ClientAuth.REJECT
    assert method_for("carol", MD5) == ClientAuth.REJECT
    assert method_for("carol", SCRAM) == ClientAuth.SCRAM
    assert method_for("dave", "") == ClientAuth.TRUST
