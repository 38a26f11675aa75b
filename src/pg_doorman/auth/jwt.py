"""JSON Web Tokens as passwords, as PgDoorman uses them.

- A user whose `password` is `jwt-pkey-fpath:<file>` logs in with a token instead of a
  password: the pooler asks for a cleartext password (use TLS), and accepts an RS256
  token signed by the private half of the RSA public key in <file>, whose
  `preferred_username` is the user name and whose `exp` has not passed (nor its `nbf`
  not come).
- A `server_password` of `jwt-priv-key-fpath:<file>` answers a server's cleartext
  password request with a token for `server_username`, signed with the RSA private key
  in <file> and valid for two minutes: another pg_doorman can check it.

Only RS256 is accepted: a token's header cannot pick another algorithm (no `none`, no
HMAC keyed with the public key), nor a key (`jwk`, `jku`, `x5u` and `kid` are not read
here). Keys are RSA keys of at least 2048 bits. Parsing is strict, so that a token reads
one way only: canonical base64url, JSON without NaN/Infinity or repeated member names,
and `exp`/`nbf` finite numbers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pg_doorman.auth.methods import JWT_PRIVATE_KEY_PREFIX as PRIVATE_KEY_PREFIX
from pg_doorman.auth.methods import JWT_PUBLIC_KEY_PREFIX as PUBLIC_KEY_PREFIX

# cryptography is imported where a key is loaded or used, not here: it adds about 7 MiB
# to the resident memory of every pooler process, and most configurations have no key.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.hashes import HashAlgorithm

# How long a token the pooler signs for a server login is valid, seconds.
SERVER_TOKEN_LIFETIME = 120
# Clock difference between token issuer and pooler tolerated for exp and nbf, seconds.
LEEWAY = 30
# A token longer than this is refused before any decoding (a password message can be 1 GB).
MAX_TOKEN_BYTES = 16 * 1024
# Smaller RSA keys can be factored: whoever does it signs tokens for anyone.
MIN_RSA_KEY_BITS = 2048
_HEADER = {"alg": "RS256", "typ": "JWT"}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class JwtError(Exception):
    """A token or key that can't be used; the message says why (for the log)."""


class _RepeatedName(ValueError):
    """A JSON object names a member twice: parsers differ on which one counts."""


def excerpt(value: object) -> str:
    """A value of an unverified token as the log shows it: quoted, and short."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:60]}..."


def is_public_key_password(password: str) -> bool:
    return password.startswith(PUBLIC_KEY_PREFIX)


def is_private_key_password(password: str) -> bool:
    return password.startswith(PRIVATE_KEY_PREFIX)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str, what: str) -> bytes:
    # Strict: the standard decoder would skip characters outside the alphabet, and
    # ignore the unused low bits of the last character (one signature, four spellings).
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise JwtError(f"the token's {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwtError(f"the token's {what} is not base64url") from None
    if _b64url(data) != text:
        raise JwtError(f"the token's {what} is not canonical base64url")
    return data


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise JwtError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class TokenVerifier:
    """The RSA public key of `jwt-pkey-fpath:`; equal when the file's contents are."""

    path: str
    digest: str
    key: rsa.RSAPublicKey = field(compare=False, repr=False)

    @classmethod
    def load(cls, path: str) -> TokenVerifier:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        data = _read(path)
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise JwtError(f"{path} is not a PEM public key") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise JwtError(f"{path} is not an RSA public key (RS256 needs one)")
        _check_key_size(path, key.key_size)
        return cls(path, hashlib.sha256(data).hexdigest(), key)

    def refusal(self, password_message: bytes, user: str) -> str | None:
        """Why the token in a PasswordMessage body is refused, or None if it is valid."""
        try:
            self.check(password_message.removesuffix(b"\x00").decode("utf-8"), user)
        except UnicodeDecodeError:
            return "the token is not UTF-8"
        except JwtError as exc:
            return str(exc)
        return None

    def check(self, token: str, user: str, now: float | None = None) -> None:
        """Raise JwtError unless `token` is a valid RS256 token for `user`."""
        claims = self.claims(token, now)
        if claims.get("preferred_username") != user:
            raise JwtError(
                f"the token is for {excerpt(claims.get('preferred_username'))}, not for {user!r}"
            )

    def claims(self, token: str, now: float | None = None) -> dict[str, Any]:
        """The claims of an RS256 token signed with this key, in its time of validity
        (JwtError otherwise)."""
        from cryptography.exceptions import InvalidSignature

        header, parts = token_header(token)
        if header.get("alg") != "RS256":
            raise JwtError(f"the token's algorithm is {excerpt(header.get('alg'))}, not RS256")
        if "crit" in header:
            # Extensions the token says must be understood: none is (RFC 7515, 4.1.11).
            raise JwtError("the token's header has crit: no extension is supported")
        signature = _unb64url(parts[2], "signature")
        try:
            self.key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"), *_rs256())
        except (InvalidSignature, UnicodeEncodeError):
            raise JwtError("the token's signature does not match the key") from None
        claims = _json_object(_unb64url(parts[1], "claims"), "claims")
        now = time.time() if now is None else now
        if "exp" not in claims:
            raise JwtError("the token has no exp claim")
        exp = _number(claims["exp"])
        if exp is None:
            raise JwtError("the token's exp claim is not a number")
        if now > exp + LEEWAY:
            raise JwtError("the token has expired")
        if "nbf" in claims:
            nbf = _number(claims["nbf"])
            if nbf is None:
                raise JwtError("the token's nbf claim is not a number")
            if now + LEEWAY < nbf:
                raise JwtError("the token is not valid yet (nbf)")
        return claims


def token_header(token: str) -> tuple[dict[str, Any], list[str]]:
    """A token's header (not yet verified) and its three parts."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtError("the token is too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT (three dot-separated parts)")
    return _json_object(_unb64url(parts[0], "header"), "header"), parts


@dataclass(frozen=True)
class TokenSigner:
    """The RSA private key of `jwt-priv-key-fpath:`; equal when the file's contents are."""

    path: str
    digest: str
    key: rsa.RSAPrivateKey = field(compare=False, repr=False)

    @classmethod
    def load(cls, path: str) -> TokenSigner:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        data = _read(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise JwtError(f"{path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise JwtError(f"{path} is not an RSA private key (RS256 needs one)")
        _check_key_size(path, key.key_size)
        return cls(path, hashlib.sha256(data).hexdigest(), key)

    def token_for(self, user: str, now: float | None = None) -> str:
        """A token for `user`, valid for SERVER_TOKEN_LIFETIME seconds."""
        issued = int(time.time() if now is None else now)
        claims = {
            "preferred_username": user,
            "iat": issued,
            "nbf": issued,
            "exp": issued + SERVER_TOKEN_LIFETIME,
        }
        return sign(self.key, claims)


def sign(
    key: rsa.RSAPrivateKey, claims: dict[str, Any], header: dict[str, Any] | None = None
) -> str:
    head = _b64url(json.dumps(header or _HEADER, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = key.sign(f"{head}.{body}".encode("ascii"), *_rs256())
    return f"{head}.{body}.{_b64url(signature)}"


def _rs256() -> tuple[padding.PKCS1v15, HashAlgorithm]:
    """RS256's padding and hash, for signing and verifying alike."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PKCS1v15(), hashes.SHA256()


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            data, object_pairs_hook=_unique_members, parse_constant=_not_a_json_number
        )
    except _RepeatedName as exc:
        raise JwtError(f"the token's {what} has the member {exc} twice") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: arrays or objects nested too deep, in a header that is read
        # before the signature is checked (any client can send one).
        raise JwtError(f"the token's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise JwtError(f"the token's {what} is not a JSON object")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise _RepeatedName(excerpt(name))
        members[name] = value
    return members


def _not_a_json_number(name: str) -> None:
    # Python's json reads NaN, Infinity and -Infinity; JSON has no such numbers.
    raise ValueError(f"{name} is not JSON")


def _check_key_size(path: str, bits: int) -> None:
    if bits < MIN_RSA_KEY_BITS:
        raise JwtError(
            f"{path} is a {bits}-bit RSA key: at least {MIN_RSA_KEY_BITS} bits are required"
        )


def _number(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (true and false, and
    integers beyond a float's range, included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
