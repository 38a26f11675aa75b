"""PAM checks against the system's real libpam, with a service file of the test's own
(helpers.pam)."""

from __future__ import annotations

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


def test_checks_run_in_their_own_threads(tmp_path: Path) -> None:
    service = str(pam_service(tmp_path, {"alice": "pw"}))
    futures = [
        pam.executor().submit(pam.authenticate, service, "alice", pw, None)
        for pw in ("pw", "no", "pw", "no", "pw", "no")
    ]
    assert [f.result(timeout=30) is None for f in futures] == [True, False] * 3
