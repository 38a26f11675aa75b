"""What a statement's text may leave on the server's session that its tag does not show.

In transaction pooling mode the pooler learns from the command tags what a transaction
left behind for the next client (`SET`, `CREATE TABLE`, ...; framing.cleanup_flags).
Three things leave no such tag, and are read from the texts instead:

- Session-level advisory locks (`pg_advisory_lock` and its `_shared` and `pg_try_`
  forms) outlive the transaction that takes them; the pooler then asks the server which
  locks its session holds (net/server.py). The transaction-level functions
  (`pg_advisory_xact_lock`, ...) end with their transaction and are not reported.
- Temporary tables made by `CREATE TEMP TABLE ... AS` or `SELECT ... INTO TEMP`, whose
  tag is `SELECT n` like any query's, or inside a `DO` block: a text with `temp` or
  `temporary` before TABLE, VIEW, SEQUENCE or RECURSIVE or after INTO, or a name in
  `pg_temp`, counts as one that may have made some (in a string or a comment too). A
  false alarm costs a `DISCARD TEMP` when the server next changes hands.
- `set_config(name, value, false)`, a session-level setting made inside a query. A
  call whose third argument is not plainly true (a parameter, an expression, a text cut
  short) counts as session-level; it costs a `RESET ALL` at check-in.

A `DO` block's `SET`s are tagged `DO`; that tag is read with the others (framing).

Names are matched in any case (PostgreSQL folds unquoted names to lower case). The
common text names none of them: it costs one pass (_text_effects.c in the compiled
build).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pg_doorman import implementation

if TYPE_CHECKING:
    from mypy_extensions import i64

# What text_effects() reports, as bits of net/server.py's cleanup flags: the first two
# are framing's CLEAN_SET and CLEAN_TEMP (which imports this module), the calls use
# values no CLEAN_* flag uses. Literals, so that the compiled build inlines them.
SETS_PARAMETERS: Final = 1  # set_config(..., false): RESET ALL at check-in
MAY_CREATE_TEMP: Final = 16  # DISCARD TEMP before another client's transaction
CALLS_LOCK: Final = 64  # pg_advisory_lock[_shared], pg_try_advisory_lock[_shared]
CALLS_UNLOCK: Final = 128  # pg_advisory_unlock[_shared], pg_advisory_unlock_all
CALLS_ANY: Final = 192  # both

# What candidates() reports (see _text_effects.c).
SEEN_ADVISORY: Final = 1
SEEN_SET_CONFIG: Final = 2
SEEN_TEMP: Final = 4

_ADVISORY: Final = b"advisory_"
_SET_CONFIG: Final = b"set_config"
_TEMP: Final = b"temp"
# What may follow a function's name: its argument list, after optional whitespace or a
# comment, or the closing quote of a quoted name.
_AFTER_NAME: Final = frozenset(b'( \t\n\r\f/-"')
_SPACE: Final = frozenset(b" \t\n\r\f")
_COMMENT_START: Final = frozenset(b"/-")
# The kinds of object that CREATE TEMP makes (RECURSIVE: CREATE TEMP RECURSIVE VIEW).
_TEMP_OBJECTS: Final = (b"table", b"view", b"sequence", b"recursive")
# Third arguments of set_config that make the setting last only to the transaction's
# end, as PostgreSQL reads a boolean (lowered, spaces around removed).
_LOCAL: Final = frozenset(
    (b"true", b"'true'", b"'t'", b"'on'", b"'yes'", b"'y'", b"'1'", b"true::boolean", b"true::bool")
)


def candidates_with_find(data: bytes, start: int, end: int) -> int:
    """`_text_effects.candidates` with the standard library: the SEEN_* bits for the
    words data[start:end] contains, in any mix of case."""
    text = data[start:end].lower()
    found = 0
    if _ADVISORY in text:
        found |= SEEN_ADVISORY
    if _SET_CONFIG in text:
        found |= SEEN_SET_CONFIG
    if _TEMP in text:
        found |= SEEN_TEMP
    return found


def _pick_candidates() -> Callable[[bytes, int, int], int]:
    if implementation.ACTIVE == "compiled":  # the build holds the C helper too
        from pg_doorman.protocol import _text_effects

        return _text_effects.candidates
    return candidates_with_find


# The test every text passes.
_candidates: Final = _pick_candidates()


def text_effects(data: bytes, start: i64, end: i64) -> int:
    """SETS_PARAMETERS, MAY_CREATE_TEMP, CALLS_LOCK and CALLS_UNLOCK, ORed, for the text
    in data[start:end] (0: none of them): a whole text, or a piece of one read in
    several reads."""
    seen = _candidates(data, start, end)
    if not seen:
        return 0
    text = data[start:end].lower()
    found = 0
    if seen & SEEN_ADVISORY:
        found |= _advisory_calls(text)
    if seen & SEEN_SET_CONFIG and _sets_for_session(text):
        found |= SETS_PARAMETERS
    if seen & SEEN_TEMP and _names_temp(text):
        found |= MAY_CREATE_TEMP
    return found


def _continues_name(byte: int) -> bool:
    """Letters, digits, `_`, `$` and non-ASCII bytes continue a name."""
    return (
        0x61 <= byte <= 0x7A
        or 0x41 <= byte <= 0x5A
        or 0x30 <= byte <= 0x39
        or byte == 0x5F
        or byte == 0x24
        or byte >= 0x80
    )


def _advisory_calls(text: bytes) -> int:
    found = 0
    at = text.find(_ADVISORY)
    while at >= 0:
        name_end = at + len(_ADVISORY)
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
        at = text.find(_ADVISORY, at + 1)
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
    return begin == 0 or not _continues_name(text[begin - 1])


def _names_temp(text: bytes) -> bool:
    """`temp` or `temporary` as a statement making a temporary object writes it (before
    TABLE, VIEW, SEQUENCE or RECURSIVE, or after INTO), or a name beginning `pg_temp`
    (the session's temporary schema, `pg_temp_3` among them)."""
    at = text.find(_TEMP)
    while at >= 0:
        if text.endswith(b"pg_", 0, at):
            return True
        if at == 0 or not _continues_name(text[at - 1]):
            word_end = at + 4
            if text.startswith(b"orary", word_end):
                word_end += 5
            if (word_end == len(text) or not _continues_name(text[word_end])) and (
                _temp_object_follows(text, word_end) or _follows_into(text, at)
            ):
                return True
        at = text.find(_TEMP, at + 1)
    return False


def _temp_object_follows(text: bytes, at: int) -> bool:
    """What follows the word at `at` is a kind of object made temporary, a comment (not
    read further), or the end of the text (the rest may come in the next read)."""
    at = _skip_spaces(text, at)
    if at == len(text) or text[at] in _COMMENT_START:
        return True
    for kind in _TEMP_OBJECTS:
        if text.startswith(kind, at):
            end = at + len(kind)
            return end == len(text) or not _continues_name(text[end])
    return False


def _follows_into(text: bytes, at: int) -> bool:
    """The word at `at` comes after INTO (SELECT ... INTO TEMP name)."""
    while at > 0 and text[at - 1] in _SPACE:
        at -= 1
    return text.endswith(b"into", 0, at) and (at == 4 or not _continues_name(text[at - 5]))


def _sets_for_session(text: bytes) -> bool:
    """A call of set_config in the text whose setting may outlive the transaction."""
    at = text.find(_SET_CONFIG)
    while at >= 0:
        name_end = at + len(_SET_CONFIG)
        if at == 0 or not _continues_name(text[at - 1]):
            if name_end < len(text) and text[name_end] == 0x22:  # "set_config"
                name_end += 1
            opening = _skip_spaces(text, name_end)
            if opening == len(text) or text[opening] in _COMMENT_START:
                return True  # the arguments are cut off, or follow a comment
            if text[opening] == 0x28 and not _local_setting(text, opening + 1):
                return True
        at = text.find(_SET_CONFIG, at + 1)
    return False


def _skip_spaces(text: bytes, at: int) -> int:
    while at < len(text) and text[at] in _SPACE:
        at += 1
    return at


def _local_setting(text: bytes, at: int) -> bool:
    """The argument list from text[at:] (after its opening parenthesis) has a third
    argument that is plainly true. Anything this does not follow (a comment, a
    dollar-quoted or escaped string, a list cut short) counts as not."""
    depth = 0
    commas = 0
    third = 0
    while at < len(text):
        byte = text[at]
        if byte == 0x27 or byte == 0x22:  # a string or a quoted name: to its closing quote
            if byte == 0x27 and text[at - 1] == 0x65 and not _continues_name(text[at - 2]):
                return False  # E'...', where a backslash may escape the quote
            close = text.find(bytes((byte,)), at + 1)
            if close < 0:
                return False
            at = close + 1  # a doubled quote inside reads as two strings: the same end
            continue
        if byte == 0x24:  # a parameter ($1), else a dollar quote
            at += 1
            if at == len(text) or not 0x30 <= text[at] <= 0x39:
                return False
            while at < len(text) and 0x30 <= text[at] <= 0x39:
                at += 1
            continue
        if byte == 0x5C or text.startswith(b"--", at) or text.startswith(b"/*", at):
            return False
        if byte == 0x28 or byte == 0x5B:
            depth += 1
        elif byte == 0x29 or byte == 0x5D:
            if depth == 0:
                return commas == 2 and text[third:at].strip() in _LOCAL
            depth -= 1
        elif byte == 0x2C and depth == 0:
            commas += 1
            third = at + 1
        at += 1
    return False
