"""A coroutine driven by its connection rather than by an asyncio task.

A client's login is a coroutine that waits for the client's next message (and, for a
pool's first login, for a server). Its connection resumes it with `resume()` as soon as
what it waits for arrives: no task, future or event-loop turn per step. The login
suspends with `await SUSPEND`; the value passed to `resume()` is what the await returns.

Not compiled (it is not in `implementation.COMPILED_MODULES`): `__await__` must be a
plain generator, which compiled code awaits like any other awaitable.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final

from pg_doorman import implementation


class Suspend:
    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self)


SUSPEND: Final = Suspend()


def resume_with_send(coro: Coroutine[Any, Any, Any], value: object) -> bool:
    """`_resume.resume` with the coroutine's own `send`: True once it has finished."""
    try:
        coro.send(value)
    except StopIteration:
        return True
    return False


def _pick_resume() -> Callable[[Coroutine[Any, Any, Any], object], bool]:
    if implementation.ACTIVE == "compiled":  # the build holds the C helper too
        from pg_doorman.net import _resume

        return _resume.resume
    return resume_with_send


# How a connection resumes its coroutine: in the compiled build, catching the
# StopIteration that ends it costs a traceback entry (see _resume.c).
resume: Final = _pick_resume()
