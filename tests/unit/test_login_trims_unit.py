"""SCRAM's per-login helpers: the memos of HMAC pads and salt texts stay bounded and
correct, and the attribute-name check written for the compiled build accepts exactly
what the string methods it replaces accepted."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from pg_doorman.auth import scram
from pg_doorman.auth.scram import ScramError, ScramVerifier


def test_hmac_pads_memo_is_bounded_and_answers_right_after_emptying() -> None:
    keys = [i.to_bytes(4, "big") * 8 for i in range(scram._HMAC_PADS_MAX + 40)]
    for key in keys:
        assert scram._hmac(key, b"auth message") == hmac.digest(key, b"auth message", "sha256")
        assert len(scram._HMAC_PADS) <= scram._HMAC_PADS_MAX
    # The first keys were dropped when the memo filled: computed again, still right.
    assert keys[0] not in scram._HMAC_PADS
    assert scram._hmac(keys[0], b"again") == hmac.digest(keys[0], b"again", "sha256")
    assert keys[0] in scram._HMAC_PADS


@settings(max_examples=200)
@given(key=st.binary(max_size=130), data=st.binary(max_size=300))
def test_hmac_matches_the_standard_library(key: bytes, data: bytes) -> None:
    # Keys past a block (64 bytes) are hashed first, as RFC 2104 says.
    assert scram._hmac(key, data) == hmac.digest(key, data, "sha256")
    assert scram._hmac(key, data) == hmac.digest(key, data, "sha256")  # from the memo


def test_salt_text_memo_is_bounded_and_answers_right_after_emptying() -> None:
    def verifier(i: int) -> ScramVerifier:
        return ScramVerifier(4096 + i, b"salt" + i.to_bytes(4, "big"), b"s" * 32, b"k" * 32)

    def expected(v: ScramVerifier) -> str:
        return f"s={base64.b64encode(v.salt).decode()},i={v.iterations}"

    verifiers = [verifier(i) for i in range(scram._SALT_TEXTS_MAX + 40)]
    for v in verifiers:
        assert scram._salt_and_iterations(v) == expected(v)
        assert len(scram._SALT_TEXTS) <= scram._SALT_TEXTS_MAX
    assert verifiers[0].salt not in scram._SALT_TEXTS
    assert scram._salt_and_iterations(verifiers[0]) == expected(verifiers[0])
    # Same salt, another iteration count: the count is not taken from the memo.
    other = ScramVerifier(1, verifiers[0].salt, b"s" * 32, b"k" * 32)
    assert scram._salt_and_iterations(other) == expected(other)


_NEAR_ASCII = st.characters(max_codepoint=0x17F)


def _attribute_name_was_valid(part: str) -> bool:
    return len(part) >= 2 and part[1] == "=" and part[0].isascii() and part[0].isalpha()


@settings(max_examples=500)
@given(part=st.text(alphabet=_NEAR_ASCII, max_size=6))
def test_attribute_names_accepted_as_before(part: str) -> None:
    try:
        attributes = scram._attributes(part, "message")
        accepted = True
    except ScramError:
        accepted = False
    assert accepted == all(_attribute_name_was_valid(p) for p in part.split(","))
    if accepted:
        assert attributes == [(p[0], p[2:]) for p in part.split(",")]


def test_attribute_names_are_exactly_the_ascii_letters() -> None:
    letters = {chr(c) for c in range(0x200) if chr(c).isascii() and chr(c).isalpha()}
    for code in range(0x200):
        char = chr(code)
        try:
            scram._attributes(f"{char}=value", "message")
            assert char in letters, char
        except ScramError:
            assert char not in letters, char


@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
def test_xor(a: bytes, b: bytes) -> None:
    assert scram._xor(a, b) == bytes(x ^ y for x, y in zip(a, b, strict=True))


def test_sha256() -> None:
    assert scram._sha256(b"client key") == hashlib.sha256(b"client key").digest()
