"""PG_DOORMAN_EVENT_LOOP: which loop the pooler runs on, and what it refuses."""

from __future__ import annotations

import asyncio

import pytest

from pg_doorman.app import event_loop


@pytest.mark.parametrize(
    ("value", "kind"),
    [("", "uvloop"), ("auto", "uvloop"), (" UVLOOP ", "uvloop"), ("asyncio", "asyncio")],
)
def test_the_choice_follows_the_variable(value: str, kind: str) -> None:
    pytest.importorskip("uvloop")
    chosen, reason = event_loop.choose({event_loop.ENV: value})
    assert chosen == kind
    assert reason == (None if kind == "uvloop" else "PG_DOORMAN_EVENT_LOOP=asyncio")
    loop = event_loop.new_event_loop({event_loop.ENV: value})
    try:
        assert type(loop).__module__.partition(".")[0] == kind
        described = event_loop.describe(loop)
        assert described.startswith("uvloop" if kind == "uvloop" else "asyncio event loop")
    finally:
        loop.close()


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(event_loop.EventLoopChoiceError, match="expected one of auto, uvloop"):
        event_loop.choose({event_loop.ENV: "trio"})
    with pytest.raises(event_loop.EventLoopChoiceError):
        event_loop.new_event_loop({event_loop.ENV: "trio"})


def test_the_standard_loop_is_a_plain_asyncio_loop() -> None:
    loop = event_loop.new_event_loop({event_loop.ENV: "asyncio"})
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_the_description_of_a_loop_made_elsewhere_names_the_bad_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    loop = asyncio.new_event_loop()
    try:
        assert event_loop.describe(loop) == (
            "asyncio event loop: PG_DOORMAN_EVENT_LOOP='trio': "
            "expected one of auto, uvloop, asyncio"
        )
    finally:
        loop.close()
