"""Which event loop runs the pooler: uvloop when installed, asyncio's own otherwise.

uvloop is a dependency wherever it is published (Linux and macOS on CPython), and the
compiled hot path writes straight to the sockets under its transports
(`net/writer.py`). asyncio's own loop runs the same code, more slowly. The environment
variable `PG_DOORMAN_EVENT_LOOP` overrides the choice: `uvloop` refuses to start without
it, `asyncio` runs the standard loop even where uvloop is installed (to tell a uvloop
problem from the pooler's own).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Final

from pg_doorman.implementation import env_choice

ENV: Final = "PG_DOORMAN_EVENT_LOOP"
CHOICES: Final = ("auto", "uvloop", "asyncio")


class EventLoopChoiceError(Exception):
    """`PG_DOORMAN_EVENT_LOOP` asks for something that cannot run here."""


def _uvloop_problem() -> str | None:
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        return f"uvloop is not installed ({exc})"
    return None


def choose(environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(`uvloop` or `asyncio`, why not uvloop or None)."""
    wanted = env_choice(environ, ENV, CHOICES, EventLoopChoiceError)
    if wanted == "asyncio":
        return "asyncio", f"{ENV}=asyncio"
    problem = _uvloop_problem()
    if problem is None:
        return "uvloop", None
    if wanted == "uvloop":
        raise EventLoopChoiceError(f"{ENV}=uvloop, but {problem}")
    return "asyncio", problem


def new_event_loop(environ: Mapping[str, str] = os.environ) -> asyncio.AbstractEventLoop:
    """A new loop of the chosen kind (EventLoopChoiceError if the choice is impossible)."""
    kind, _ = choose(environ)
    if kind == "asyncio":
        return asyncio.new_event_loop()
    import uvloop

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """For the startup log line: the loop running, and why not uvloop when it is not."""
    if type(loop).__module__.partition(".")[0] == "uvloop":
        return "uvloop"
    try:
        _, problem = choose()
    except EventLoopChoiceError as exc:  # a loop made by other means than ours
        problem = str(exc)
    return f"asyncio event loop: {problem}" if problem else "asyncio event loop"
