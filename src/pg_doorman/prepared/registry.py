"""Prepared statements shared across clients: pool registry and per-server LRU.

A client's Parse is mapped by content (query text, parameter types and the client's
startup settings that change name resolution) to one server-side statement whose name
is derived from that content (and the registry's generation: see
PoolStatements.replan), so every server connection of a pool, in any worker process,
calls the same statement by the same name.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from pg_doorman.protocol.messages import build
from pg_doorman.protocol.text_effects import text_effects


class StatementEntry:
    """One distinct statement of a pool."""

    __slots__ = (
        "context",
        "evicted",
        "generation",
        "hits",
        "key",
        "kinds",
        "misses",
        "name",
        "named_by_bind",
        "parse_message",
        "query",
        "shape",
        "text_effects",
    )

    def __init__(
        self,
        key: bytes,
        context: bytes,
        name: bytes,
        parse_message: bytes,
        query: bytes,
        generation: int = 0,
    ) -> None:
        self.key = key  # the Parse body after the client's name, then `context`
        self.generation = generation  # the registry's when the entry was made (see replan)
        self.context = context  # the settings the text is read under (see lookup)
        self.name = name  # server-side name, no NUL
        # How a Bind to the unnamed portal names it (the portal's NUL, the name, its
        # NUL): put in whole for every such Bind.
        self.named_by_bind = b"\x00" + name + b"\x00"
        self.parse_message = parse_message  # complete Parse message under that name
        self.query = query
        self.hits = 0  # client Parses the server already had
        self.misses = 0  # Parses (or re-Parses) sent to a server
        self.kinds = 0  # NAMED | UNNAMED: how clients have prepared it
        self.evicted = False  # dropped from the pool registry (clients may still use it)
        # Its result columns as the pool's first Parse of it gave them (row_shape; b"":
        # none), learnt from a Describe of it; None until then.
        self.shape: bytes | None = None
        # What it may leave on the session unseen by the tags (protocol.text_effects
        # bits), reported at each Bind of it.
        self.text_effects = text_effects(query, 0, len(query))


NAMED: Final = 1
UNNAMED: Final = 2
# Distinct client settings a pool shares one object for (see shared_context); past
# that, equal contexts still match by value.
_SHARED_CONTEXTS: Final = 1024
# Generations of the entries made for statements that came with a binary upgrade's
# clients and that this process knows with other result columns (see moved_in): above
# any a registry reaches by replanning, so that no server has them under these names.
_MOVED_GENERATIONS: Final = 1 << 64


def row_shape(body: bytes) -> bytes:
    """What PostgreSQL compares of a statement's result columns to refuse a statement
    whose row type changed since its Parse (RevalidateCachedQuery, equalRowTypes): the
    number of columns and each one's name, type OID and typmod, from a RowDescription
    `body`. Where a column comes from and how it is sent (format) don't count; the
    collation, which it also compares, is not in the message. Compared as bytes:
    NoData stands for no row type at all (b""), not a row of no columns."""
    parts = [body[:2]]
    count = int.from_bytes(body[:2], "big")
    pos = 2
    for _ in range(count):
        name_end = body.find(b"\x00", pos) + 1
        if not name_end or name_end + 18 > len(body):
            return body  # malformed: compared whole
        parts.append(body[pos:name_end])
        # After the name: table OID (4), column number (2), type OID (4), type
        # length (2), typmod (4), format (2).
        parts.append(body[name_end + 6 : name_end + 10])
        parts.append(body[name_end + 12 : name_end + 16])
        pos = name_end + 18
    return b"".join(parts)


def statement_name(key: bytes, generation: int = 0) -> bytes:
    # Generation 0 hashes with blake2b's default salt (all zeros): the names of a
    # registry that never replanned are the same in every process.
    salt = generation.to_bytes(16, "big")
    return b"DOORMAN_" + hashlib.blake2b(key, digest_size=8, salt=salt).hexdigest().encode()


class PoolStatements:
    """The pool-level registry: content key -> entry, bounded LRU.

    Evicting an entry never touches servers: clients keep their entries, and servers
    keep their statements until their own LRU lets them go.
    """

    __slots__ = (
        "_contexts",
        "_entries",
        "_moved_apart",
        "_shapes",
        "capacity",
        "closed_hits",
        "closed_misses",
        "generation",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, StatementEntry] = OrderedDict()
        # ServerStatements counters of the pool's servers already closed: added to those
        # of the live servers for pool totals, so counting costs the hot path nothing.
        self.closed_hits = 0
        self.closed_misses = 0
        self._contexts: dict[bytes, bytes] = {}
        # Part of every server name: a new one (see replan) renames every statement.
        self.generation = 0
        # The shapes learnt (see learn), by server name: an entry made again for a text
        # after its eviction gets its old one's, as servers may still have it.
        self._shapes: OrderedDict[bytes, bytes] = OrderedDict()
        self._moved_apart = 0  # entries moved_in made apart from the registry

    def lookup(self, parse_body: bytes, name_end: int, context: bytes) -> StatementEntry:
        """Entry for a Parse body (`name_end`: index after the client name's NUL) read
        under `context`, the client's settings that change what a text means."""
        rest = parse_body[name_end:]
        key = rest + context
        entries = self._entries
        entry = entries.get(key)
        if entry is not None:
            entries.move_to_end(key)
            return entry
        generation = self.generation
        name = statement_name(key, generation)
        body = name + b"\x00" + rest
        message = build(b"P", body)
        query_end = rest.find(b"\x00")
        entry = StatementEntry(key, context, name, message, rest[:query_end], generation)
        entry.shape = self._shapes.get(name)
        entries[key] = entry
        if len(entries) > self.capacity:
            entries.popitem(last=False)[1].evicted = True
        return entry

    def replan(self, entry: StatementEntry) -> None:
        """PostgreSQL refused to run `entry` as the server had parsed it: what its text
        means changed since (a table it reads gained or lost a column: 0A000 "cached
        plan must not change result type"). Such a change usually spoils the
        statement on every server that has it, and others with it. A client parses
        its text again to recover (drivers do, and PostgreSQL plans the unnamed
        statement afresh at each Parse), so from now on every Parse gets a statement
        under a new name, which servers parse anew; the old ones stay for the
        clients' statements prepared before, as in PostgreSQL, until the servers'
        LRU lets them go. A refusal of a statement older than the last new
        generation changes nothing more."""
        if entry.generation != self.generation:
            return
        self.generation += 1
        for old in self._entries.values():
            old.evicted = True
        self._entries.clear()
        self._shapes.clear()  # the old names' entries keep theirs

    def moved_in(self, parse_body: bytes, context: bytes, shape: bytes | None) -> StatementEntry:
        """The entry for a statement a client prepared in the process before a binary
        upgrade, which knew its result columns as `shape` (None: not known). Until now
        unknown here, the pool takes them: the first Parse of it here checks them
        rather than learning what the text gives now. Known here with other columns
        (the schema changed since the client prepared it, and another client here
        parsed it since): the client gets an entry of its own, under a name no server
        has, with its columns, so that each use is checked and refused as PostgreSQL
        refuses it in the session that prepared it."""
        entry = self.lookup(parse_body, 0, self.shared_context(context))
        if shape is None or shape == entry.shape:
            return entry
        if entry.shape is None:
            self.learn(entry, shape)
            return entry
        self._moved_apart += 1
        generation = _MOVED_GENERATIONS + self._moved_apart
        name = statement_name(entry.key, generation)
        message = build(b"P", name + b"\x00" + parse_body)
        apart = StatementEntry(entry.key, entry.context, name, message, entry.query, generation)
        apart.shape = shape
        apart.evicted = True  # not in the registry: no other client finds it
        return apart

    def learn(self, entry: StatementEntry, shape: bytes) -> None:
        """`entry`'s result columns, from a Describe of its first Parse."""
        if entry.shape is not None:
            return
        entry.shape = shape
        if entry.generation == self.generation:
            shapes = self._shapes
            shapes[entry.name] = shape
            # Twice the entries: those evicted that clients still use come back.
            while len(shapes) > 2 * self.capacity:
                shapes.popitem(last=False)

    def shared_context(self, context: bytes) -> bytes:
        """This pool's one object equal to `context`: entries keep the context they
        were read under, and a client finds its own by identity."""
        shared = self._contexts.get(context)
        if shared is not None:
            return shared
        if len(self._contexts) < _SHARED_CONTEXTS:
            self._contexts[context] = context
        return context

    def under(self, entry: StatementEntry, context: bytes) -> StatementEntry:
        """The entry for `entry`'s text and parameter types read under `context`."""
        rest = entry.key[: len(entry.key) - len(entry.context)]
        return self.lookup(rest, 0, context)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> Iterable[StatementEntry]:
        return self._entries.values()

    @property
    def bytes(self) -> int:
        return sum(len(e.parse_message) for e in self._entries.values())


class ServerStatements:
    """Names prepared on one server connection, least recently used first.

    Evicted names stay "present" until their Close is sent, ahead of the next batch
    (see BatchRewriter._closes_ahead), so a later message can still use them.
    """

    __slots__ = ("_names", "_newest", "capacity", "hits", "misses", "pending_close", "uncertain")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._names: OrderedDict[bytes, None] = OrderedDict()
        # The most recently used name: using it again needs no move_to_end (a generic
        # call in the compiled build), and a driver often runs one statement in a row.
        self._newest = b""
        self.pending_close: list[bytes] = []
        self.hits = 0  # has() found the statement: a Parse or Bind needed no Parse
        self.misses = 0  # add(): a Parse sent to the server
        # Names the server may or may not have (a Close and Parse we sent for one
        # were both skipped after an error): not in the record, and parsed again only
        # after a Close, which is harmless when the statement is not there.
        self.uncertain: set[bytes] = set()

    def has(self, name: bytes) -> bool:
        names = self._names
        if name in names:
            if name != self._newest:
                names.move_to_end(name)
                self._newest = name
            self.hits += 1
            return True
        if name in self.pending_close:
            # Used again before its Close went out: keep it after all.
            self.pending_close.remove(name)
            self._add(name)
            self.hits += 1
            return True
        return False

    def add(self, name: bytes) -> None:
        self.misses += 1
        self._add(name)

    def _add(self, name: bytes) -> None:
        names = self._names
        names[name] = None
        self._newest = name
        # A loop: names restored after a skipped Close may have left it over capacity.
        while self.capacity and len(names) > self.capacity:
            evicted, _ = names.popitem(last=False)
            self.pending_close.append(evicted)

    def forget(self, name: bytes) -> None:
        """The server does not have it (its Parse failed or never ran)."""
        self._names.pop(name, None)
        if self.pending_close and name in self.pending_close:
            self.pending_close.remove(name)  # evicted meanwhile: nothing to close
        if name == self._newest:
            self._newest = b""

    def doubt(self, name: bytes) -> None:
        """Whether the server has it is not known (see `uncertain`)."""
        self.forget(name)
        self.uncertain.add(name)

    def restore(self, name: bytes) -> None:
        """A Close we sent was skipped: the server still has the statement (unless
        it was evicted again since, and its Close waits for the next batch)."""
        if name not in self._names and name not in self.pending_close:
            self._names[name] = None
            self._newest = name

    def take_pending_close(self) -> list[bytes]:
        pending, self.pending_close = self.pending_close, []
        return pending

    def clear(self) -> None:
        self._names.clear()
        self._newest = b""
        self.pending_close.clear()
        self.uncertain.clear()

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
