"""Talos tokens, as PgDoorman reads them: a client logs in as user `talos` and sends an
RS256 token as its cleartext password; the token says which client it is and which
roles it holds, and the pooler picks the pool user the session runs as.

- The token's header names its key by `kid`: the `[talos] keys` file with that name
  (without directory and extension) checks the signature. `exp` is required, `nbf`
  honoured.
- `resource_access` maps resources to roles: `{"postgres.prod:billing": {"roles":
  ["read_write"]}}`. The roles of the resources whose part after ':' is one of
  `[talos] databases` count; the highest of `read_only` < `read_write` < `owner` is the
  token's role. No role, or an unknown one, refuses the token.
- The pool user: the token's `clientId` when the database has a user of that name,
  else `srv-<clientId>` when it has that one, else the role's name.
- The session's application_name is the `clientId`, its control characters as '?'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pg_doorman.auth.jwt import JwtError, TokenVerifier, excerpt, token_header
from pg_doorman.config.schema import TalosConfig

logger = logging.getLogger("pg_doorman.talos")

TALOS_USER = "talos"
# From the least to the most privileged.
ROLES = ("read_only", "read_write", "owner")


class TalosKeyError(Exception):
    """A `[talos] keys` file that cannot be used; `key` is its config path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TalosToken:
    client_id: str
    role: str


@dataclass(frozen=True)
class Talos:
    """The keys and databases of `[talos]`; equal when the files' contents are."""

    keys: dict[str, TokenVerifier]
    databases: tuple[str, ...]

    @classmethod
    def load(cls, config: TalosConfig) -> Talos | None:
        """None when `[talos]` has no keys: then `talos` is a user like any other."""
        if not config.keys:
            return None
        keys: dict[str, TokenVerifier] = {}
        for i, path in enumerate(config.keys):
            try:
                keys[Path(path).stem] = TokenVerifier.load(path)
            except JwtError as exc:
                raise TalosKeyError(f"talos.keys[{i}]", str(exc)) from None
        return cls(keys, tuple(config.databases))

    def read(self, token: str, now: float | None = None) -> TalosToken:
        """The client and role of a valid token (JwtError saying why it is not)."""
        header, _ = token_header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise JwtError("the token's header names no key (kid)")
        verifier = self.keys.get(kid)
        if verifier is None:
            raise JwtError(f"no [talos] key named {excerpt(kid)}")
        claims = verifier.claims(token, now)
        client_id = claims.get("clientId", "")
        if not isinstance(client_id, str):
            raise JwtError("the token's clientId is not a string")
        access = claims.get("resource_access")
        roles: list[str] = []
        if isinstance(access, dict):
            for resource, granted in access.items():
                _, colon, database = resource.partition(":")
                if not colon or database not in self.databases:
                    continue
                listed = granted.get("roles") if isinstance(granted, dict) else None
                if not isinstance(listed, list):
                    raise JwtError(f"the token's roles for {resource!r} are not a list")
                roles.extend(str(role) for role in listed)
        if not roles:
            raise JwtError(f"the token grants no role on {', '.join(self.databases) or 'any'}")
        unknown = [role for role in roles if role not in ROLES]
        if unknown:
            raise JwtError(f"the token has an unknown role {unknown[0]!r}")
        return TalosToken(client_id, max(roles, key=ROLES.index))

    @staticmethod
    def pool_user(token: TalosToken, has_user: Callable[[str], bool]) -> tuple[str, str]:
        """The pool user a token's session runs as, and which rule chose it."""
        client_id = token.client_id
        # A name with control characters is not used to pick a user.
        if client_id and not _has_control_characters(client_id):
            if has_user(client_id):
                return client_id, "personal"
            service = f"srv-{client_id}"
            if has_user(service):
                return service, "service"
        elif client_id:
            logger.warning("talos: clientId %r has control characters: role user used", client_id)
        return token.role, "role"


def session_application_name(client_id: str) -> str:
    """A clientId as the session's application_name. Its control characters become
    '?' (as PostgreSQL cleans such names): a NUL would cut the greeting's
    ParameterStatus short, and the client would refuse the whole login."""
    if not _has_control_characters(client_id):
        return client_id
    return "".join("?" if _is_control(ch) else ch for ch in client_id)


def _is_control(ch: str) -> bool:
    return ch < " " or ch == "\x7f"


def _has_control_characters(text: str) -> bool:
    return any(_is_control(ch) for ch in text)
