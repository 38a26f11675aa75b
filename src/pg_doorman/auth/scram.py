"""SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, in both roles.

`ScramServerSession` authenticates a client against a stored verifier and recovers the
client's ClientKey from its proof; `ScramClientSession` logs in to PostgreSQL with a
plaintext password or with such a recovered ClientKey (passthrough: no password stored).

Like PostgreSQL: over TLS the server also offers SCRAM-SHA-256-PLUS with the
tls-server-end-point channel binding (RFC 5929), the GS2 header is then
"p=tls-server-end-point,,", else "n,," (or "y,," from a client that could bind but was
not offered it); no authorization identity, and the user name in client-first-message
is ignored.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import os
import re
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

from pg_doorman.memo import remember

if TYPE_CHECKING:
    from _hashlib import HASH

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING: Final = "tls-server-end-point"  # the only type PostgreSQL supports
DEFAULT_ITERATIONS: Final = 4096
DEFAULT_SALT_LENGTH: Final = 16  # what PostgreSQL generates
KEY_LENGTH: Final = 32  # SHA-256 output
_NONCE_BYTES: Final = 18  # PostgreSQL's and libpq's raw nonce length
# PostgreSQL's scram_iterations is an int: anything above is no count it could send.
MAX_ITERATIONS: Final = 2**31 - 1

_DIGITS: Final = re.compile(r"[0-9]+")


class ScramError(Exception):
    """A malformed or unexpected SCRAM message, or a feature we don't support."""


class AuthenticationFailed(Exception):
    """The client's proof or the server's signature did not verify."""


# The standard library's functions the login calls, bound once: compiled, a call of
# `binascii.b2a_base64` looks the module's attribute up first, every time.
_sha256_new: Final = hashlib.sha256
_b2a_base64: Final = binascii.b2a_base64
_a2b_base64: Final = binascii.a2b_base64
_compare_digest: Final = hmac.compare_digest
_from_bytes: Final = int.from_bytes  # a classmethod: looked up, it is bound anew each call
_urandom: Final = os.urandom

_IPAD: Final = bytes(b ^ 0x36 for b in range(256))
_OPAD: Final = bytes(b ^ 0x5C for b in range(256))

# SHA-256 states after the pads of each key used (see _hmac), by key. A dictionary
# rather than functools.lru_cache: its wrapper builds a tuple to key a bytes argument
# and keeps a recency list, each call. Emptied when full (memo.remember).
_HMAC_PADS: Final[dict[bytes, tuple[HASH, HASH]]] = {}
_HMAC_PADS_MAX: Final = 256


def _hmac_pads(key: bytes) -> tuple[HASH, HASH]:
    """SHA-256 states after the inner and outer pad of `key` (RFC 2104)."""
    pads = _HMAC_PADS.get(key)
    if pads is None:
        block = _sha256(key) if len(key) > 64 else key
        block = block.ljust(64, b"\x00")
        pads = _sha256_new(block.translate(_IPAD)), _sha256_new(block.translate(_OPAD))
        remember(_HMAC_PADS, key, pads, _HMAC_PADS_MAX)
    return pads


def _hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256. The keys here are used again and again (a user's StoredKey and
    ServerKey at every login): their pads are hashed once, each call copies two states."""
    inner_pad, outer_pad = _hmac_pads(key)
    inner = inner_pad.copy()
    inner.update(data)
    outer = outer_pad.copy()
    outer.update(inner.digest())
    return outer.digest()


def _sha256(data: bytes) -> bytes:
    return _sha256_new(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (_from_bytes(a, "big") ^ _from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    # binascii directly: base64.b64encode is a Python wrapper around it.
    return _b2a_base64(data, newline=False).decode("ascii")


def _unb64(text: str, what: str, length: int | None = None) -> bytes:
    try:
        data = _a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ScramError(f"invalid base64 in {what}") from None
    if length is not None and len(data) != length:
        raise ScramError(f"{what} must be {length} bytes, got {len(data)}")
    return data


# The base64 text of each salt sent, by salt: a user's salt goes out at every login.
_SALT_TEXTS: Final[dict[bytes, str]] = {}
_SALT_TEXTS_MAX: Final = 1024


def _salt_and_iterations(verifier: ScramVerifier) -> str:
    """The ``s=<salt>,i=<iterations>`` part of a server-first-message."""
    salt = verifier.salt
    text = _SALT_TEXTS.get(salt)
    if text is None:
        text = _b64(salt)
        remember(_SALT_TEXTS, salt, text, _SALT_TEXTS_MAX)
    return f"s={text},i={verifier.iterations}"


def _valid_iterations(text: str) -> bool:
    # Length first: int() refuses (ValueError) strings of thousands of digits.
    return (
        len(text) <= 10 and _DIGITS.fullmatch(text) is not None and 1 <= int(text) <= MAX_ITERATIONS
    )


def _new_nonce() -> str:
    # os.urandom is what secrets.token_bytes returns, without its interpreted wrapper.
    return _b64(_urandom(_NONCE_BYTES))


def _check_nonce(nonce: str, what: str) -> str:
    # printable = %x21-2B / %x2D-7E: visible ASCII except the comma (RFC 5802). String
    # methods rather than a regex: this runs twice per login.
    if not (nonce and nonce.isascii() and nonce.isprintable()) or " " in nonce or "," in nonce:
        raise ScramError(f"{what} must be non-empty printable ASCII without commas")
    return nonce


# ---- SASLprep ----------------------------------------------------------------------

_PROHIBITED: tuple[Callable[[str], bool], ...] = (
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
    stringprep.in_table_a1,  # unassigned code points (RFC 3454 A.1)
)


def saslprep(password: str) -> bytes:
    """The password bytes PostgreSQL feeds to PBKDF2 (RFC 4013 SASLprep, its way).

    PostgreSQL uses the raw UTF-8 bytes when SASLprep fails, so this never raises.
    It also skips SASLprep for pure ASCII and runs the prohibition and bidi checks on
    the mapped characters before normalisation; both are copied so verifiers agree.
    """
    raw = password.encode("utf-8")
    if password.isascii():
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    if not mapped:
        return raw
    if any(check(c) for c in mapped for check in _PROHIBITED):
        return raw
    if any(stringprep.in_table_d1(c) for c in mapped):
        if any(stringprep.in_table_d2(c) for c in mapped):
            return raw
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


# ---- keys from a password ----------------------------------------------------------


@dataclass(frozen=True)
class KeyDerivation:
    """The PBKDF2 that turns a password into (ClientKey, ServerKey) for one salt and
    iteration count. Its cost grows with `iterations` (PostgreSQL allows up to 2^31-1),
    so callers on an event loop run it elsewhere (auth/key_derivation.py)."""

    password: str
    salt: bytes
    iterations: int

    def run(self) -> tuple[bytes, bytes]:
        """Compute the keys. Touches no shared state: safe in any thread (hashlib lets
        other threads run during the PBKDF2 itself)."""
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(self.password), self.salt, self.iterations)
        # hmac.digest, not _hmac: a salted password is used twice, then never again.
        return (
            hmac.digest(salted, b"Client Key", "sha256"),
            hmac.digest(salted, b"Server Key", "sha256"),
        )


# The derived keys, least recently used first: a pool logs in again and again with the
# same password, salt and iteration count, and a miss may cost seconds.
_KEY_CACHE_SIZE: Final = 1024
_derived_keys: dict[KeyDerivation, tuple[bytes, bytes]] = {}


def cached_keys(derivation: KeyDerivation) -> tuple[bytes, bytes] | None:
    keys = _derived_keys.pop(derivation, None)
    if keys is not None:
        _derived_keys[derivation] = keys  # now the most recently used
    return keys


def remember_keys(derivation: KeyDerivation, keys: tuple[bytes, bytes]) -> None:
    if derivation not in _derived_keys and len(_derived_keys) >= _KEY_CACHE_SIZE:
        del _derived_keys[next(iter(_derived_keys))]
    _derived_keys[derivation] = keys


def derive_keys_here(derivation: KeyDerivation) -> tuple[bytes, bytes]:
    """The keys, from the cache or computed on the calling thread (and cached)."""
    keys = cached_keys(derivation)
    if keys is None:
        keys = derivation.run()
        remember_keys(derivation, keys)
    return keys


# ---- stored verifier ------------------------------------------------------------------


@dataclass(frozen=True)
class ScramVerifier:
    """What PostgreSQL stores in pg_authid.rolpassword for a SCRAM-SHA-256 role."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``."""
        try:
            mechanism, params, keys = text.split("$")
            iterations_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
        except ValueError:
            raise ScramError("not a SCRAM-SHA-256 verifier") from None
        if mechanism != MECHANISM:
            raise ScramError("not a SCRAM-SHA-256 verifier")
        if not _valid_iterations(iterations_text):
            raise ScramError("invalid iteration count in SCRAM-SHA-256 verifier")
        salt = _unb64(salt_text, "verifier salt")
        if not salt:
            raise ScramError("empty salt in SCRAM-SHA-256 verifier")
        return cls(
            int(iterations_text),
            salt,
            _unb64(stored_text, "verifier StoredKey", KEY_LENGTH),
            _unb64(server_text, "verifier ServerKey", KEY_LENGTH),
        )

    def to_text(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


@functools.lru_cache(maxsize=1024)
def is_scram_verifier(value: str) -> bool:
    """Cached: the pooler asks at every login, about the same few stored passwords."""
    try:
        ScramVerifier.parse(value)
    except ScramError:
        return False
    return True


def make_scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """The verifier PostgreSQL would store for `password` (random 16-byte salt by default)."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    if salt is None:
        salt = secrets.token_bytes(DEFAULT_SALT_LENGTH)
    elif not salt:
        raise ValueError("salt must not be empty")
    # Not through the cache: a random salt is never asked for again.
    client_key, server_key = KeyDerivation(password, salt, iterations).run()
    return ScramVerifier(iterations, salt, _sha256(client_key), server_key).to_text()


# ---- message parsing ----------------------------------------------------------------


def _decode(data: bytes, what: str) -> str:
    """Bytes to str, byte-for-byte, so the AuthMessage can be rebuilt exactly.

    Latin-1 round-trips any byte; the parts we interpret (flags, nonces, base64) are
    checked to be ASCII, and the user name is never interpreted.
    """
    if not data:
        raise ScramError(f"empty {what}")
    # `0 in data`, not `b"\x00" in data`: bytes.__contains__ first tries its argument
    # as an int, and for a bytes argument that raises (and formats) a TypeError.
    if 0 in data:
        raise ScramError(f"{what} contains a NUL byte")
    return data.decode("latin-1")


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """``a=x,b=y`` into an ordered list of (letter, value)."""
    attributes = []
    for part in text.split(","):
        # An ASCII letter, then "=": tested on the code points, as a regex match per
        # attribute costs more than the rest of the parse (and, compiled, str.isalpha()
        # is a generic call; `| 0x20` folds the upper case letters onto the lower).
        if len(part) < 2 or part[1] != "=" or not 0x61 <= (ord(part[0]) | 0x20) <= 0x7A:
            raise ScramError(f"malformed attribute {part[:20]!r} in {what}")
        attributes.append((part[0], part[2:]))
    return attributes


def _expect(attributes: list[tuple[str, str]], index: int, name: str, what: str) -> str:
    if index >= len(attributes) or attributes[index][0] != name:
        raise ScramError(f"{what} lacks the {name}= attribute where it belongs")
    return attributes[index][1]


def _escape_username(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


# ---- the pooler as a SCRAM server -----------------------------------------------------


class ScramServerSession:
    """The pooler's side of a client's SCRAM-SHA-256 login against a stored verifier."""

    mechanisms: ClassVar[tuple[str, ...]] = (MECHANISM,)
    # Over TLS with a certificate that allows binding: PostgreSQL's order.
    mechanisms_with_binding: ClassVar[tuple[str, ...]] = (MECHANISM_PLUS, MECHANISM)

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        nonce: str | None = None,
        channel_binding: bytes | None = None,
    ) -> None:
        """`channel_binding`: the tls-server-end-point data of the TLS session the
        login runs in; with it SCRAM-SHA-256-PLUS is offered (mechanisms_with_binding)."""
        self._verifier = verifier
        self._binding = channel_binding
        self._server_nonce = _check_nonce(nonce, "server nonce") if nonce else _new_nonce()
        self._state = "start"  # -> "first" -> "done"; "failed" after any error
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._client_key: bytes | None = None

    def handle_client_first(self, mechanism: str, data: bytes) -> bytes:
        """SASLInitialResponse data -> AuthenticationSASLContinue data (server-first)."""
        if self._state != "start":
            raise ScramError("unexpected client-first-message")
        self._state = "failed"  # until this message is accepted
        plus = mechanism == MECHANISM_PLUS
        if plus and self._binding is None:
            raise ScramError("channel binding (SCRAM-SHA-256-PLUS) is not offered here")
        if not plus and mechanism != MECHANISM:
            raise ScramError(f"unsupported SASL mechanism {mechanism!r}")
        text = _decode(data, "client-first-message")
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed client-first-message")
        flag, authzid, bare = parts
        if flag.startswith("p"):
            if not plus:
                raise ScramError(
                    "the client selected SCRAM-SHA-256 without channel binding, but its "
                    "message includes channel binding data"
                )
            if flag != "p=" + CHANNEL_BINDING:
                raise ScramError(f"unsupported channel binding type {flag[2:22]!r}")
        elif plus:
            raise ScramError(
                "the client selected SCRAM-SHA-256-PLUS, but its message does not include "
                "channel binding data"
            )
        elif flag == "y" and self._binding is not None:
            # A client that can bind was told the server cannot: someone in between
            # took SCRAM-SHA-256-PLUS off the list (a downgrade).
            raise ScramError(
                "channel binding negotiation error: the client supports channel binding "
                "but thinks the server does not, and this server does"
            )
        elif flag not in ("n", "y"):
            raise ScramError(f"malformed channel binding flag {flag[:20]!r}")
        if authzid:
            raise ScramError("authorization identities (a=...) are not supported")
        attributes = _attributes(bare, "client-first-message")
        if attributes[0][0] == "m":
            raise ScramError("mandatory SCRAM extensions (m=...) are not supported")
        _expect(attributes, 0, "n", "client-first-message")  # the user name: ignored
        client_nonce = _expect(attributes, 1, "r", "client-first-message")
        _check_nonce(client_nonce, "client nonce")
        # Further (optional) extensions are ignored, as PostgreSQL does.
        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        verifier = self._verifier
        self._server_first = f"r={self._nonce},{_salt_and_iterations(verifier)}"
        self._state = "first"
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        """SASLResponse data -> AuthenticationSASLFinal data (``v=<signature>``)."""
        if self._state != "first":
            raise ScramError("unexpected client-final-message")
        self._state = "failed"
        text = _decode(data, "client-final-message")
        attributes = _attributes(text, "client-final-message")
        channel = _expect(attributes, 0, "c", "client-final-message")
        nonce = _expect(attributes, 1, "r", "client-final-message")
        proof_text = _expect(attributes, len(attributes) - 1, "p", "client-final-message")
        expected = self._gs2_header.encode("ascii")
        if self._gs2_header[0] == "p":
            assert self._binding is not None
            expected += self._binding
        if not _compare_digest(_unb64(channel, "channel binding"), expected):
            raise ScramError("channel binding attribute does not match client-first-message")
        if nonce != self._nonce:
            raise ScramError("nonce mismatch in client-final-message")
        proof = _unb64(proof_text, "client proof", KEY_LENGTH)
        without_proof = text[: len(text) - len(proof_text) - 3]  # drop ",p=<proof>"
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("latin-1")
        verifier = self._verifier
        client_key = _xor(proof, _hmac(verifier.stored_key, auth_bytes))
        if not _compare_digest(_sha256(client_key), verifier.stored_key):
            raise AuthenticationFailed("SCRAM proof does not verify (wrong password)")
        self._client_key = client_key
        self._state = "done"
        return f"v={_b64(_hmac(verifier.server_key, auth_bytes))}".encode("ascii")

    @property
    def client_key(self) -> bytes:
        """The client's ClientKey, recovered from its proof; only after a successful login."""
        if self._client_key is None:
            raise ScramError("no successful SCRAM exchange yet")
        return self._client_key


# ---- the pooler as a SCRAM client -------------------------------------------------------


class ScramClientSession:
    """The pooler logging in to PostgreSQL with SCRAM-SHA-256.

    With `password` the keys come from PBKDF2 over the salt and iteration count the
    server sends. With `client_key` (passthrough) no PBKDF2 is done, so the server's
    verifier must be the one the key was recovered against; otherwise the server
    refuses the proof. `server_key`, when known, lets us check the server's signature.
    `username` only exists to reproduce RFC test vectors: PostgreSQL ignores it.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
        username: str = "",
    ) -> None:
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password and client_key")
        if password is not None and server_key is not None:
            raise ValueError("server_key is derived from the password; don't pass both")
        if client_key is not None and len(client_key) != KEY_LENGTH:
            raise ValueError(f"client_key must be {KEY_LENGTH} bytes")
        if server_key is not None and len(server_key) != KEY_LENGTH:
            raise ValueError(f"server_key must be {KEY_LENGTH} bytes")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = _check_nonce(nonce, "client nonce") if nonce else _new_nonce()
        self._client_first_bare = f"n={_escape_username(username)},r={self._nonce}"
        self._auth_message = b""
        self._server_first = b""
        self._combined_nonce = ""
        # -> "first_read" -> "final_sent" -> "done"; "failed" after a bad server-first
        self._state = "start"

    def client_first(self) -> bytes:
        """The SASLInitialResponse data: ``n,,n=,r=<nonce>``."""
        return ("n,," + self._client_first_bare).encode("utf-8")

    def handle_server_first(self, data: bytes) -> bytes:
        """AuthenticationSASLContinue data -> SASLResponse data (client-final-message).

        Runs a PBKDF2 not cached yet on the calling thread: an event loop uses
        read_server_first, use_keys and client_final instead."""
        derivation = self.read_server_first(data)
        if derivation is not None:
            self.use_keys(derive_keys_here(derivation))
        return self.client_final()

    def read_server_first(self, data: bytes) -> KeyDerivation | None:
        """Check the AuthenticationSASLContinue data (server-first-message). None when
        the keys are at hand (passthrough, or cached): client_final() answers at once.
        Otherwise the PBKDF2 to run, whose keys go to use_keys() first."""
        if self._state != "start":
            raise ScramError("unexpected server-first-message")
        self._state = "failed"
        text = _decode(data, "server-first-message")
        attributes = _attributes(text, "server-first-message")
        if attributes[0][0] == "m":
            raise ScramError("mandatory SCRAM extensions (m=...) are not supported")
        nonce = _expect(attributes, 0, "r", "server-first-message")
        salt_text = _expect(attributes, 1, "s", "server-first-message")
        iterations_text = _expect(attributes, 2, "i", "server-first-message")
        _check_nonce(nonce, "server nonce")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        salt = _unb64(salt_text, "salt")
        if not salt:
            raise ScramError("empty salt in server-first-message")
        if not _valid_iterations(iterations_text):
            raise ScramError(f"invalid iteration count {iterations_text[:20]!r}")
        self._server_first = data
        self._combined_nonce = nonce
        self._state = "first_read"
        if self._password is None:
            return None
        derivation = KeyDerivation(self._password, salt, int(iterations_text))
        keys = cached_keys(derivation)
        if keys is None:
            return derivation
        self.use_keys(keys)
        return None

    def use_keys(self, keys: tuple[bytes, bytes]) -> None:
        """(ClientKey, ServerKey) of the derivation read_server_first asked for."""
        self._client_key, self._server_key = keys

    def client_final(self) -> bytes:
        """The SASLResponse data (client-final-message), once the keys are known."""
        if self._state != "first_read" or self._client_key is None:
            raise ScramError("no server-first-message or no keys to answer it with")
        without_proof = f"c={_b64(b'n,,')},r={self._combined_nonce}"
        self._auth_message = b",".join(
            (
                self._client_first_bare.encode("utf-8"),
                self._server_first,
                without_proof.encode("ascii"),
            )
        )
        signature = _hmac(_sha256(self._client_key), self._auth_message)
        proof = _xor(self._client_key, signature)
        self._state = "final_sent"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def handle_server_final(self, data: bytes) -> None:
        """Check AuthenticationSASLFinal data; raises unless the server proved itself."""
        if self._state != "final_sent":
            raise ScramError("unexpected server-final-message")
        # A failure here leaves the state alone: checking the server is side-effect free.
        text = _decode(data, "server-final-message")
        attributes = _attributes(text, "server-final-message")
        if attributes[0][0] == "e":
            raise AuthenticationFailed(f"server refused the SCRAM login: {attributes[0][1]}")
        signature = _unb64(
            _expect(attributes, 0, "v", "server-final-message"), "server signature", KEY_LENGTH
        )
        if len(attributes) != 1:
            raise ScramError("unexpected attributes after the server signature")
        if self._server_key is not None:
            expected = _hmac(self._server_key, self._auth_message)
            if not hmac.compare_digest(expected, signature):
                raise AuthenticationFailed("server signature does not verify")
        # Passthrough without the verifier's ServerKey has nothing to check it with.
        self._state = "done"
