"""What the tests expect the pooler to run, from PG_DOORMAN_IMPL and the build."""

from __future__ import annotations

import importlib.util
import os

import pytest

from pg_doorman.implementation import ENV, build_problem


def expect_compiled() -> bool:
    wanted = os.environ.get(ENV, "auto")
    return wanted == "compiled" or (wanted == "auto" and build_problem() is None)


def needs_c_helper(module: str) -> pytest.MarkDecorator:
    """Skip unless the C helper `module` is built (`make compiled`)."""
    built = importlib.util.find_spec(module) is not None
    return pytest.mark.skipif(not built, reason="no compiled build (make compiled)")
