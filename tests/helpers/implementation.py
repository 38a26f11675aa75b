"""What the tests expect the pooler to run, from PG_DOORMAN_IMPL and the build."""

from __future__ import annotations

import os

from pg_doorman.implementation import ENV, build_problem


def expect_compiled() -> bool:
    wanted = os.environ.get(ENV, "auto")
    return wanted == "compiled" or (wanted == "auto" and build_problem() is None)
