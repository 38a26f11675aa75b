"""The users of one pool found by auth_query, and the pools that serve them.

Two modes, as in PgDoorman:

- passthrough (no `auth_query.server_user`): each user gets a pool of its own,
  `auth_query.pool_size` servers logged in as that user with the looked-up hash
  (md5 pass-the-hash, or the ClientKey of the user's SCRAM login);
- dedicated (`server_user` set): every looked-up user shares one pool logged in as
  `server_user` / `server_password`.

A passthrough pool that has had no client for the pool's `idle_timeout` is closed and
forgotten; the user's next login builds it again. In passthrough mode, a
`startup_parameters` column of the lookup (a JSON object) adds to the startup parameters
of the user's own pool, over `[general]`'s and the pool's, as far as the StartupMessage
has room; in dedicated mode the pool is shared and the column is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pg_doorman.auth.auth_query import (
    DROPPED_OVERLAY_OVERSIZE,
    DROPPED_OVERSIZE,
    AuthQuery,
    LookupConnections,
)
from pg_doorman.auth.methods import JWT_PRIVATE_KEY_PREFIX, JWT_PUBLIC_KEY_PREFIX
from pg_doorman.auth.scram import ScramVerifier
from pg_doorman.config import Config, PoolConfig, UserConfig
from pg_doorman.config.loader import STARTUP_PARAMETERS_BUDGET, startup_size
from pg_doorman.config.schema import AuthQueryConfig
from pg_doorman.net.server import BackendCredentials
from pg_doorman.pool.pool import Pool, PoolSettings

if TYPE_CHECKING:
    from pg_doorman.app.pooler import PoolEntry, Pooler

logger = logging.getLogger("pg_doorman.auth_query")


@dataclass(frozen=True)
class LookedUpUser:
    """A user the lookup found: what its login is checked against."""

    password: str  # "" when there is no usable one (NULL, a key file's name)
    parameters: dict[str, str]
    scram_verifier: ScramVerifier | None


def lookup_settings(pool_settings: PoolSettings, auth_query: AuthQueryConfig) -> PoolSettings:
    """The lookup connections' pool: the data pool's server, its TLS and timeouts,
    `auth_query.database` (default: the pool's server database) and user, and no
    startup parameters."""
    return PoolSettings(
        database=pool_settings.database,
        user=auth_query.user,
        pool_size=max(auth_query.workers, 1),
        pool_mode="session",
        connect_timeout=pool_settings.connect_timeout,
        server_lifetime=pool_settings.server_lifetime,
        idle_check_timeout=0.0,
        server_host=pool_settings.server_host,
        server_port=pool_settings.server_port,
        server_database=auth_query.database or pool_settings.server_database,
        server_user=auth_query.user,
        application_name=f"{pool_settings.application_name} auth_query",
        prepared_statements=False,
        server_tls=pool_settings.server_tls,
    )


class AuthQueryUsers:
    def __init__(
        self,
        pooler: Pooler,
        database: str,
        pool_config: PoolConfig,
        lookup: AuthQuery,
    ) -> None:
        self.pooler = pooler
        self.database = database
        self.pool_config = pool_config
        self.lookup = lookup
        # Users seen, by name (in dedicated mode their entries share `shared`'s pool).
        self.users: dict[str, PoolEntry] = {}
        self.shared: PoolEntry | None = None
        # Passthrough pools without clients: since when (monotonic).
        self._unused_since: dict[str, float] = {}

    def same_lookup(self, auth_query: AuthQueryConfig, settings: PoolSettings) -> bool:
        """Whether a reloaded config keeps this lookup (and its cache) as it is."""
        return (
            self.lookup.config == auth_query and self.lookup.connections.pool.settings == settings
        )

    @property
    def auth_query(self) -> AuthQueryConfig:
        assert self.pool_config.auth_query is not None
        return self.pool_config.auth_query

    def _user_config(self, user: str, password: str) -> UserConfig:
        aq = self.auth_query
        if aq.server_user is not None:
            return UserConfig(
                username=aq.server_user,
                password="",
                pool_size=aq.pool_size,
                min_pool_size=aq.min_pool_size,
                server_password=aq.server_password if aq.server_password is not None else "",
            )
        return UserConfig(
            username=user, password=password, pool_size=aq.pool_size, min_pool_size=aq.min_pool_size
        )

    def build(self, config: Config) -> None:
        """Dedicated mode: the shared pool exists from the start (its login is known),
        so min_pool_size is opened before the first client."""
        aq = self.auth_query
        if aq.server_user is None:
            return
        user = self._user_config(aq.server_user, "")
        self.shared = self.pooler.pool_entry_for(
            config, self.database, self.pool_config, user, None
        )

    def listed(self) -> Iterator[tuple[tuple[str, str], PoolEntry]]:
        """The pools to show and run: the shared one, or one per passthrough user."""
        if self.shared is not None:
            yield (self.database, self.shared.user.username), self.shared
            return
        for user, entry in self.users.items():
            yield (self.database, user), entry

    async def find(self, user: str) -> LookedUpUser | None:
        """What a login of `user` is checked against; None if the lookup found nobody.
        No pool yet: that waits for the login to succeed (admit)."""
        found, password, parameters = await self.lookup.user(user)
        if not found:
            return None
        return self._looked_up(user, password, parameters)

    async def find_again(self, user: str) -> LookedUpUser | None:
        """After a failed password exchange: the user fetched anew, or None when there
        is nothing new (rate limited, unchanged, or gone)."""
        fresh = await self.lookup.refetch(user)
        if fresh is None or not fresh[0]:
            return None
        return self._looked_up(user, fresh[1], fresh[2])

    def _looked_up(self, user: str, password: str, parameters: dict[str, str]) -> LookedUpUser:
        if password.startswith((JWT_PUBLIC_KEY_PREFIX, JWT_PRIVATE_KEY_PREFIX)):
            # Key files come from the config only: the database can't make the pooler
            # open a file of its choosing. Such a user has no usable password.
            logger.warning("auth_query: user %r: a looked-up password names a JWT key", user)
            password = ""
        entry = self.users.get(user)
        if entry is not None and entry.password == password:
            verifier = entry.scram_verifier  # parsed once per password, not per login
        else:
            verifier = self.pooler.scram_verifier_of(password)
        return LookedUpUser(password, parameters, verifier)

    async def entry(self, user: str) -> PoolEntry | None:
        """The entry of a user who has already logged in (a client handed over by the
        process a binary upgrade replaces); None if the lookup found nobody."""
        looked_up = await self.find(user)
        return None if looked_up is None else self.admit(user, looked_up)

    def admit(self, user: str, looked_up: LookedUpUser) -> PoolEntry:
        """The entry a user who has just logged in with `looked_up` is served by: its
        pool is created (or updated) here, once the password has been checked."""
        return self._entry_with(user, looked_up.password, looked_up.parameters)

    def _fitting(
        self, user: str, parameters: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The looked-up parameters that fit the StartupMessage next to the configured
        ones (in the column's order), and those that do not."""
        general = self.pooler.config.general.startup_parameters
        merged = {**general, **self.pool_config.startup_parameters}
        fitting: dict[str, str] = {}
        dropped: dict[str, str] = {}
        for key, value in parameters.items():
            if startup_size({**merged, key: value}) <= STARTUP_PARAMETERS_BUDGET:
                merged[key] = value
                fitting[key] = value
            else:
                dropped[key] = value
        return fitting, dropped

    def _note_dropped(
        self,
        user: str,
        parameters: dict[str, str],
        dropped: dict[str, str],
        before: PoolEntry | None,
    ) -> None:
        """Warn about and count parameters left out, once per change of what is."""
        if not dropped or (before is not None and before.dropped_parameters == dropped):
            return
        logger.warning(
            "auth_query: user %r: startup parameters %s left out: the StartupMessage "
            "would exceed %d bytes",
            user,
            ", ".join(dropped),
            STARTUP_PARAMETERS_BUDGET,
        )
        alone = startup_size(parameters) > STARTUP_PARAMETERS_BUDGET
        self.lookup.stats.count_dropped(DROPPED_OVERSIZE if alone else DROPPED_OVERLAY_OVERSIZE)

    def _entry_with(self, user: str, password: str, parameters: dict[str, str]) -> PoolEntry:
        from pg_doorman.app.pooler import PoolEntry

        entry = self.users.get(user)
        # In use again: the sweep must not close the pool under a login in progress.
        self._unused_since.pop(user, None)
        if self.shared is not None:
            parameters = {}  # one pool for every user: nothing of a user's own
        if (
            entry is not None
            and entry.password == password
            and {**entry.looked_up_parameters, **entry.dropped_parameters} == parameters
        ):
            return entry
        config = self.pooler.config
        if self.shared is not None:
            # Dedicated: the user's own password for the client login; the pool and
            # the backend login are the shared ones.
            client_user = UserConfig(username=user, password=password)
            verifier = self.pooler.scram_verifier_of(password)
            if entry is None:
                entry = PoolEntry(
                    pool=self.shared.pool,
                    user=client_user,
                    password=password,
                    credentials=BackendCredentials(user=user),
                    scram_verifier=verifier,
                )
                self.users[user] = entry
            else:
                entry.user, entry.password, entry.scram_verifier = client_user, password, verifier
            return entry
        user_config = self._user_config(user, password)
        fitting, dropped = self._fitting(user, parameters)
        self._note_dropped(user, parameters, dropped, entry)
        updated = self.pooler.pool_entry_for(
            config, self.database, self.pool_config, user_config, entry, fitting
        )
        updated.looked_up_parameters, updated.dropped_parameters = fitting, dropped
        if entry is None:
            self.lookup.stats.dynamic_pools_created += 1
            logger.info("pool %s@%s created for a user found by auth_query", user, self.database)
            updated.pool.retain(0)  # opens min_pool_size servers
        elif updated is not entry:
            self.pooler.retire_pool(entry.pool)
        self.users[user] = updated
        return updated

    def sweep(self, in_use: set[Pool], logged_in: set[str], now: float) -> None:
        """Close passthrough pools that have had no client for idle_timeout; forget
        dedicated-mode users no client of this pool is logged in as (`logged_in`), and
        the lookup's expired cache entries."""
        self.lookup.drop_expired()
        if self.shared is not None:
            for user in [user for user in self.users if user not in logged_in]:
                del self.users[user]
            return
        for user, entry in list(self.users.items()):
            pool = entry.pool
            if pool in in_use:
                self._unused_since.pop(user, None)
                continue
            since = self._unused_since.setdefault(user, now)
            limit = pool.settings.idle_timeout
            if limit > 0 and now - since >= limit:
                del self.users[user]
                del self._unused_since[user]
                self.pooler.drop_pool(pool, "no client for idle_timeout")
                self.lookup.stats.dynamic_pools_destroyed += 1
                logger.info("pool %s@%s closed: no client for %gs", user, self.database, limit)

    def reload(self, config: Config, pool_config: PoolConfig) -> None:
        """Take a reloaded pool config with the same lookup: pools keep running where
        their kind allows, the others are retired."""
        self.pool_config = pool_config
        self.lookup.connections.pause_patience = config.general.query_wait_timeout / 1000.0
        if self.shared is not None:
            server_user = self._user_config(self.auth_query.server_user or "", "")
            shared = self.pooler.pool_entry_for(
                config, self.database, pool_config, server_user, self.shared
            )
            if shared is not self.shared:
                self.pooler.retire_pool(self.shared.pool)
                self.shared = shared
                self.users.clear()  # their entries point at the retired pool
            return
        for name, entry in list(self.users.items()):
            user_config = self._user_config(name, entry.password)
            parameters = {**entry.looked_up_parameters, **entry.dropped_parameters}
            fitting, dropped = self._fitting(name, parameters)
            self._note_dropped(name, parameters, dropped, entry)
            updated = self.pooler.pool_entry_for(
                config, self.database, pool_config, user_config, entry, fitting
            )
            updated.looked_up_parameters, updated.dropped_parameters = fitting, dropped
            if updated is not entry:
                self.pooler.retire_pool(entry.pool)
                self.users[name] = updated

    def close(self, reason: str, *, retire: bool) -> None:
        """Stop the lookup; with `retire`, also the pools (a reload changed them)."""
        self.lookup.close(reason)
        self.pooler.forget_credentials(self.lookup.connections.pool)
        if retire:
            for _, entry in self.listed():
                self.pooler.retire_pool(entry.pool)
        self.users.clear()
        self.shared = None


def new_auth_query_users(
    pooler: Pooler, config: Config, database: str, pool_config: PoolConfig
) -> AuthQueryUsers:
    aq = pool_config.auth_query
    assert aq is not None
    settings = pooler.lookup_pool_settings(config, database, pool_config)
    pool = Pool(settings, pooler.connect_server, pooler.loop)
    if pooler.database_paused(database):
        pool.pause()  # a lookup enabled by a reload during PAUSE waits for RESUME too
    pooler.set_credentials(pool, BackendCredentials(user=aq.user, password=aq.password or None))
    patience = config.general.query_wait_timeout / 1000.0
    lookup = AuthQuery(aq, LookupConnections(pool, pooler.connect_server, patience))
    users = AuthQueryUsers(pooler, database, pool_config, lookup)
    users.build(config)
    return users
