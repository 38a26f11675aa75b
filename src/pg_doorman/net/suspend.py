"""A coroutine driven by its connection rather than by an asyncio task.

A client's login is a coroutine that waits for the client's next message (and, for a
pool's first login, for a server). Its connection resumes it with `send()` as soon as
what it waits for arrives: no task, future or event-loop turn per step. The login
suspends with `await SUSPEND`; the value passed to `send()` is what the await returns.

Not compiled (it is not in `implementation.COMPILED_MODULES`): `__await__` must be a
plain generator, which compiled code awaits like any other awaitable.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Final


class Suspend:
    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self)


SUSPEND: Final = Suspend()
