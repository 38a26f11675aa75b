"""A PAM service of a test's own: pam_exec runs a script that compares the password
(PAM's authtok on its stdin) with a file per user, and records each check."""

from __future__ import annotations

from pathlib import Path

_CHECK = """#!/bin/sh
password=$(tr -d '\\000')
echo "$PAM_USER|$PAM_RHOST|$PAM_TYPE" >> "$(dirname "$0")/seen"
{delay}[ "$password" = "$(cat "$(dirname "$0")/password.$PAM_USER" 2>/dev/null)" ]
"""


def pam_service(directory: Path, passwords: dict[str, str], *, delay: float = 0.0) -> Path:
    """A service file that accepts each user of `passwords` with its password, after
    `delay` seconds; each check first appends "user|client address|auth" to
    `directory`/seen."""
    directory.mkdir(parents=True, exist_ok=True)
    check = directory / "check"
    check.write_text(_CHECK.format(delay=f"sleep {delay}\n" if delay else ""))
    check.chmod(0o755)
    for user, password in passwords.items():
        (directory / f"password.{user}").write_text(password)
    service = directory / "pg_doorman_test"
    service.write_text(
        f"auth required pam_exec.so expose_authtok quiet {check}\naccount required pam_permit.so\n"
    )
    return service


def pam_checks(directory: Path) -> list[str]:
    """The checks PAM ran so far, oldest first."""
    seen = directory / "seen"
    return seen.read_text().splitlines() if seen.exists() else []
