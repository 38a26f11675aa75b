"""How a connection resumes its login coroutine: the C helper `_resume.resume`
(compiled build) and its fallback through `send`, which must behave alike."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from tests.helpers.implementation import expect_compiled, needs_c_helper

from pg_doorman.net import suspend
from pg_doorman.net.suspend import SUSPEND, resume_with_send

Resume = Callable[[Coroutine[Any, Any, Any], object], bool]

needs_helper = needs_c_helper("pg_doorman.net._resume")


def _helper() -> Resume:
    from pg_doorman.net import _resume

    return _resume.resume


RESUMES = [
    pytest.param(lambda: resume_with_send, id="send"),
    pytest.param(_helper, id="C helper", marks=needs_helper),
]


@pytest.fixture(params=RESUMES)
def resume(request: pytest.FixtureRequest) -> Resume:
    factory: Callable[[], Resume] = request.param
    return factory()


async def _two_waits(seen: list[object]) -> str:
    seen.append(await SUSPEND)
    seen.append(await SUSPEND)
    return "done"


def test_each_step_runs_to_the_next_wait_and_the_last_reports_the_end(resume: Resume) -> None:
    seen: list[object] = []
    coro = _two_waits(seen)
    assert resume(coro, None) is False  # started: waits for its first value
    assert seen == []
    assert resume(coro, "first") is False
    assert seen == ["first"]
    assert resume(coro, 2) is True  # returned: its value is not wanted
    assert seen == ["first", 2]
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        resume(coro, None)


async def _fails_after_one_wait() -> None:
    await SUSPEND
    raise ValueError("bad message")


def test_an_error_in_the_coroutine_reaches_the_caller_and_ends_it(resume: Resume) -> None:
    coro = _fails_after_one_wait()
    assert resume(coro, None) is False
    with pytest.raises(ValueError, match="bad message"):
        resume(coro, None)
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        resume(coro, None)


async def _nested(seen: list[object]) -> None:
    # As the login awaits its steps: the inner coroutine's waits suspend the outer one.
    seen.append(await _two_waits(seen))


def test_waits_inside_an_awaited_coroutine_suspend_the_whole(resume: Resume) -> None:
    seen: list[object] = []
    coro = _nested(seen)
    assert [resume(coro, value) for value in (None, "a", "b")] == [False, False, True]
    assert seen == ["a", "b", "done"]


def test_a_coroutine_that_never_waits_ends_at_its_first_step(resume: Resume) -> None:
    async def at_once() -> int:
        return 1

    assert resume(at_once(), None) is True


@needs_helper
def test_the_helper_rejects_bad_arguments() -> None:
    helper = _helper()
    coro = _two_waits([])
    with pytest.raises(TypeError, match="takes 2 arguments"):
        helper(coro)  # type: ignore[call-arg]
    coro.close()
    # What `(42).send(None)` raises in the fallback too.
    with pytest.raises(AttributeError, match="send"):
        helper(42, None)  # type: ignore[arg-type]


def test_connections_resume_with_the_helper_only_with_the_compiled_build() -> None:
    if expect_compiled():
        assert suspend.resume is _helper()
    else:
        assert suspend.resume is resume_with_send
