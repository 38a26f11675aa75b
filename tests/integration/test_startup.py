"""What the pooler says about itself when it starts."""

from __future__ import annotations

from helpers.implementation import expect_compiled
from helpers.pooler import PoolerFactory


def test_startup_log_names_the_hot_path_implementation(pooler: PoolerFactory) -> None:
    proc = pooler()
    compiled = expect_compiled()
    expected = "compiled hot path" if compiled else "pure-Python hot path"
    proc.wait_for_log(expected)
    assert ("pure-Python hot path" in proc.log_text()) is not compiled
