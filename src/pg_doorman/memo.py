"""Bounded memos: results rebuilt at every login, kept by what they were built from.

Their keys come from clients (an application_name per client, say), so a memo cannot
grow without end: once full it is emptied and fills again with what is in use now.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, limit: int) -> None:
    """Keep `value` under `key`, emptying `memo` first when it holds `limit` entries."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
