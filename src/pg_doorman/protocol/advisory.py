"""Which session-level advisory lock functions a statement's text calls.

A session-level advisory lock (`pg_advisory_lock` and its `_shared` and `pg_try_`
forms) outlives the transaction that takes it; in transaction pooling mode it would
stay on a server the pool hands to other clients, and the client's own unlock would
run on another server. The pooler reads each Query's and each prepared statement's
text for those names, in any case (PostgreSQL folds unquoted names to lower case), and
then asks the server which locks its session holds (net/server.py). The
transaction-level functions (`pg_advisory_xact_lock`, ...) end with their transaction
and are not reported.

The common text names none of them: it costs one pass for "advisory_" (_advisory.c in
the compiled build).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pg_doorman import implementation

if TYPE_CHECKING:
    from mypy_extensions import i64

# What advisory_calls() reports, as bits (also in net/server.py's cleanup flags, hence
# values no framing.CLEAN_* flag uses).
CALLS_LOCK: Final = 64  # pg_advisory_lock[_shared], pg_try_advisory_lock[_shared]
CALLS_UNLOCK: Final = 128  # pg_advisory_unlock[_shared], pg_advisory_unlock_all
CALLS_ANY: Final = 192  # both: a literal, so that the compiled build inlines it

_INFIX: Final = b"advisory_"
_INFIX_LAST: Final = b"_"
# What may follow a function's name: its argument list, after optional whitespace or a
# comment, or the closing quote of a quoted name.
_AFTER_NAME: Final = frozenset(b'( \t\n\r\f/-"')


def mentions_with_find(data: bytes, start: int, end: int) -> bool:
    """`_advisory.mentions` with the standard library: data[start:end] contains
    "advisory_" in any mix of case."""
    return data.find(_INFIX_LAST, start, end) >= 0 and _INFIX in data[start:end].lower()


def _pick_mentions() -> Callable[[bytes, int, int], bool]:
    if implementation.ACTIVE == "compiled":  # the build holds the C helper too
        from pg_doorman.protocol import _advisory

        return _advisory.mentions
    return mentions_with_find


# The test every text passes (see _advisory.c).
_mentions: Final = _pick_mentions()


def advisory_calls(data: bytes, start: i64, end: i64) -> int:
    """CALLS_LOCK and/or CALLS_UNLOCK for the text in data[start:end] (0: neither)."""
    if not _mentions(data, start, end):
        return 0
    return _read_calls(data[start:end].lower())


def _read_calls(text: bytes) -> int:
    found = 0
    at = text.find(_INFIX)
    while at >= 0:
        name_end = at + len(_INFIX)
        if text.startswith(b"lock", name_end):
            kind = CALLS_LOCK
            name_end += 4
            if text.startswith(b"_shared", name_end):
                name_end += 7
        elif text.startswith(b"unlock", name_end):
            kind = CALLS_UNLOCK
            name_end += 6
            if text.startswith(b"_shared", name_end):
                name_end += 7
            elif text.startswith(b"_all", name_end):
                name_end += 4
        else:
            kind = 0  # pg_advisory_xact_lock and the like
        if (
            kind
            and _function_prefix(text, at, kind)
            and (name_end == len(text) or text[name_end] in _AFTER_NAME)
        ):
            found |= kind
        at = text.find(_INFIX, at + 1)
    return found


def _function_prefix(text: bytes, at: int, kind: int) -> bool:
    """The name at `at` starts as one of the functions': `pg_`, or `pg_try_` for a
    lock, at the start of the text or after a character that cannot continue a name."""
    if text.endswith(b"pg_", 0, at):
        begin = at - 3
    elif kind == CALLS_LOCK and text.endswith(b"pg_try_", 0, at):
        begin = at - 7
    else:
        return False
    if begin == 0:
        return True
    before = text[begin - 1]
    # Letters (lowered already), digits, `_`, `$` and non-ASCII bytes continue a name.
    return (
        not (before == 0x5F or before == 0x24 or 0x30 <= before <= 0x39 or 0x61 <= before <= 0x7A)
        and before < 0x80
    )
