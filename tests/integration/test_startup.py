"""What the pooler says about itself when it starts."""

from __future__ import annotations

import os

from helpers.pooler import PoolerFactory
from pg_doorman.implementation import ENV, build_problem


def test_startup_log_names_the_hot_path_implementation(pooler: PoolerFactory) -> None:
    proc = pooler()
    wanted = os.environ.get(ENV, "auto")
    compiled = wanted == "compiled" or (wanted == "auto" and build_problem() is None)
    expected = "compiled hot path" if compiled else "pure-Python hot path"
    proc.wait_for_log(expected)
    assert ("pure-Python hot path" in proc.log_text()) is not compiled
