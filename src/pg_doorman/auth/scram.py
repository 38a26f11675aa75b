"""SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, both roles.

`ScramServerSession` authenticates a client against a stored verifier and recovers the
client's ClientKey from its proof; `ScramClientSession` logs in to PostgreSQL with a
password or with such a recovered ClientKey (passthrough, no password stored).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass
from typing import ClassVar

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096


class ScramError(Exception):
    """A malformed or unexpected SCRAM message."""


class AuthenticationFailed(Exception):
    """The proof (or the server's signature) did not verify."""


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ScramError(f"invalid base64 in {what}") from exc


def _nonce() -> str:
    return _b64(secrets.token_bytes(18))


def saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep; like PostgreSQL, fall back to the raw bytes when it fails."""
    raw = password.encode("utf-8")
    if password.isascii() and all(0x20 <= ord(c) < 0x7F for c in password):
        return raw  # nothing to map, normalize or prohibit
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return raw
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for char in normalized:
        if any(check(char) for check in prohibited):
            return raw
    has_ral = any(stringprep.in_table_d1(c) for c in normalized)
    if has_ral:
        if any(stringprep.in_table_d2(c) for c in normalized):
            return raw
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return raw
    return normalized.encode("utf-8")


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


@dataclass(frozen=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`."""
        try:
            mechanism, params, keys = text.split("$")
            iterations_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
            iterations = int(iterations_text)
        except ValueError:
            raise ScramError("not a SCRAM-SHA-256 verifier") from None
        if mechanism != MECHANISM or iterations < 1:
            raise ScramError("not a SCRAM-SHA-256 verifier")
        stored_key = _unb64(stored_text, "StoredKey")
        server_key = _unb64(server_text, "ServerKey")
        if len(stored_key) != 32 or len(server_key) != 32:
            raise ScramError("SCRAM-SHA-256 verifier keys must be 32 bytes")
        return cls(iterations, _unb64(salt_text, "salt"), stored_key, server_key)

    def to_text(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


def is_scram_verifier(value: str) -> bool:
    try:
        ScramVerifier.parse(value)
    except ScramError:
        return False
    return True


def make_scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = _salted_password(password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    server_key = _hmac(salted, b"Server Key")
    return ScramVerifier(iterations, salt, _sha256(client_key), server_key).to_text()


def _attributes(message: str, what: str) -> dict[str, str]:
    """`a=b,c=d` into a dict; every attribute is one letter and appears once."""
    attributes: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError(f"malformed attribute {part!r} in {what}")
        if part[0] in attributes:
            raise ScramError(f"duplicate attribute {part[0]!r} in {what}")
        attributes[part[0]] = part[2:]
    return attributes


def _decode(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"{what} is not valid UTF-8") from None
    if not text.isprintable():
        raise ScramError(f"{what} contains unprintable characters")
    return text


class ScramServerSession:
    """The pooler's side of a client's SCRAM-SHA-256 login."""

    mechanisms: ClassVar[tuple[str, ...]] = (MECHANISM,)

    def __init__(self, verifier: ScramVerifier, *, nonce: str | None = None) -> None:
        self._verifier = verifier
        self._server_nonce = nonce or _nonce()
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._client_key: bytes | None = None

    def handle_client_first(self, mechanism: str, data: bytes) -> bytes:
        if mechanism != MECHANISM:
            raise ScramError(f"unsupported SASL mechanism {mechanism!r}")
        text = _decode(data, "client-first-message")
        flag, sep, rest = text.partition(",")
        if not sep:
            raise ScramError("malformed client-first-message")
        if flag.startswith("p"):
            raise ScramError("channel binding is not supported")
        if flag not in ("n", "y"):
            raise ScramError(f"malformed channel binding flag {flag!r}")
        authzid, sep, bare = rest.partition(",")
        if not sep or (authzid and not authzid.startswith("a=")):
            raise ScramError("malformed client-first-message")
        self._gs2_header = f"{flag},{authzid},"
        attributes = _attributes(bare, "client-first-message")
        if "m" in attributes:
            raise ScramError("SCRAM extensions are not supported")
        if "n" not in attributes or "r" not in attributes or not attributes["r"]:
            raise ScramError("client-first-message lacks the user name or nonce")
        if "," in attributes["r"]:
            raise ScramError("invalid client nonce")
        self._client_first_bare = bare
        self._nonce = attributes["r"] + self._server_nonce
        verifier = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(verifier.salt)},i={verifier.iterations}"
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        if not self._server_first:
            raise ScramError("client-final-message before client-first-message")
        text = _decode(data, "client-final-message")
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final-message lacks the proof")
        attributes = _attributes(without_proof, "client-final-message")
        channel = _unb64(attributes.get("c", ""), "channel binding")
        if channel != self._gs2_header.encode("ascii"):
            raise ScramError("channel binding data does not match")
        if attributes.get("r") != self._nonce:
            raise ScramError("nonce mismatch")
        proof = _unb64(proof_text, "proof")
        if len(proof) != 32:
            raise ScramError("invalid proof length")
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        verifier = self._verifier
        signature = _hmac(verifier.stored_key, auth_message.encode("utf-8"))
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(_sha256(client_key), verifier.stored_key):
            raise AuthenticationFailed("SCRAM proof does not verify")
        self._client_key = client_key
        server_signature = _hmac(verifier.server_key, auth_message.encode("utf-8"))
        return f"v={_b64(server_signature)}".encode("ascii")

    @property
    def client_key(self) -> bytes:
        if self._client_key is None:
            raise ScramError("no successful SCRAM exchange yet")
        return self._client_key


class ScramClientSession:
    """The pooler logging in to PostgreSQL with SCRAM-SHA-256."""

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
    ) -> None:
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password and client_key")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = nonce or _nonce()
        self._client_first_bare = f"n=,r={self._nonce}"
        self._auth_message = b""

    def client_first(self) -> bytes:
        return ("n,," + self._client_first_bare).encode("ascii")

    def handle_server_first(self, data: bytes) -> bytes:
        text = _decode(data, "server-first-message")
        attributes = _attributes(text, "server-first-message")
        nonce = attributes.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        salt = _unb64(attributes.get("s", ""), "salt")
        try:
            iterations = int(attributes.get("i", ""))
        except ValueError:
            raise ScramError("invalid iteration count") from None
        if iterations < 1:
            raise ScramError("invalid iteration count")
        if self._password is not None:
            salted = _salted_password(self._password, salt, iterations)
            self._client_key = _hmac(salted, b"Client Key")
            self._server_key = _hmac(salted, b"Server Key")
        assert self._client_key is not None
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = ",".join((self._client_first_bare, text, without_proof)).encode()
        stored_key = _sha256(self._client_key)
        proof = _xor(self._client_key, _hmac(stored_key, self._auth_message))
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def handle_server_final(self, data: bytes) -> None:
        text = _decode(data, "server-final-message")
        attributes = _attributes(text, "server-final-message")
        if "e" in attributes:
            raise AuthenticationFailed(f"server refused SCRAM login: {attributes['e']}")
        if "v" not in attributes:
            raise ScramError("server-final-message lacks the signature")
        if self._server_key is None:
            return  # passthrough without the verifier's ServerKey: nothing to check with
        expected = _hmac(self._server_key, self._auth_message)
        if not hmac.compare_digest(expected, _unb64(attributes["v"], "server signature")):
            raise AuthenticationFailed("server signature does not verify")
