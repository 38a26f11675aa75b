"""Messages a server login awaits one at a time (a client's login is driven without a
task: see net/suspend.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pg_doorman.protocol.framing import MessageBuffer


class AwaitableInbox(MessageBuffer):
    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        super().feed(data)
        self.wake()

    def wake(self) -> None:
        """Let a waiting receive() look again (new bytes, or the peer went away)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self, gone: Callable[[], Exception | None]) -> tuple[int, bytes]:
        """The next whole message; `gone()` returns the error to raise once the peer left."""
        while True:
            msg = self.next_message()
            if msg is not None:
                return msg
            error = gone()
            if error is not None:
                raise error
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None
