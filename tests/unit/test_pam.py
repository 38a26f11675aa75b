"""PAM checks against the system's real libpam, with a service file of the test's own
(helpers.pam)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.pam import pam_checks, pam_service
from pg_doorman.auth import pam


def test_pam_accepts_the_right_password_only(tmp_path: Path) -> None:
    service = str(pam_service(tmp_path, {"alice": "s3cret pässword"}))
    pam.check_service(service)
    assert pam.authenticate(service, "alice", "s3cret pässword", "10.1.2.3") is None
    assert pam.authenticate(service, "alice", "s3cret", "10.1.2.3") is not None
    assert pam.authenticate(service, "alice", "", None) is not None
    assert pam.authenticate(service, "bob", "s3cret pässword", None) is not None
    # The client's address reaches the modules as PAM_RHOST.
    assert pam_checks(tmp_path) == [
        "alice|10.1.2.3|auth",
        "alice|10.1.2.3|auth",
        "alice||auth",
        "bob||auth",
    ]


def test_a_service_file_that_is_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pam.PamUnavailable, match="no PAM service file"):
        pam.check_service(str(tmp_path / "absent"))
    pam.check_service("login")  # a name: PAM looks in /etc/pam.d itself


def test_checks_run_in_threads_a_few_at_a_time(tmp_path: Path) -> None:
    """Six checks of 0.3 s with two slots: three rounds, answers in order of asking."""
    service = str(pam_service(tmp_path, {"alice": "pw"}, delay=0.3))

    async def main() -> tuple[list[bool], float]:
        checks = pam.PamChecks(limit=2)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(checks.check(service, "alice", pw, None) for pw in ("pw", "no") * 3)
        )
        return [a is None for a in answers], time.monotonic() - started

    accepted, took = asyncio.run(main())
    assert accepted == [True, False] * 3
    assert 0.9 <= took < 5


def test_a_check_that_never_ends_does_not_hold_up_the_exit(tmp_path: Path) -> None:
    """The pooler's exit doesn't wait for a PAM module that hangs."""
    service = pam_service(tmp_path, {"alice": "pw"}, delay=60)
    program = (
        "import asyncio, sys\n"
        "from pg_doorman.auth import pam\n"
        "async def main():\n"
        "    checks = pam.PamChecks()\n"
        f"    task = asyncio.ensure_future(checks.check({str(service)!r}, 'alice', 'pw', None))\n"
        "    await asyncio.sleep(0.5)\n"
        "    print('waiting' if not task.done() else 'done', flush=True)\n"
        "asyncio.run(main())\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout) == (0, "waiting\n"), result.stderr
    assert time.monotonic() - started < 20
