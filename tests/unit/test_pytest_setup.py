"""The test run's own settings: a failing test is always reported.

pytest's hook for unraisable exceptions formats them inside the garbage collector; on
CPython before 3.11.8 a collection that lands in pytest's own ast.parse of the failing
test's source then crashes the whole run (INTERNALERROR, "AST constructor recursion
depth mismatch") and the failure is never shown. pyproject.toml turns that hook off.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

FAILING_TEST = """
import gc
import os


class RaisesWhenCollected:
    def __init__(self):
        self.cycle = self

    def __del__(self):
        raise RuntimeError("collected")


def test_fails_with_garbage_about():
    gc.collect()
    # The next collection falls while pytest parses this file to show the failure.
    gc.set_threshold(int(os.environ["GC_THRESHOLD"]))
    for _ in range(50):
        RaisesWhenCollected()
    assert 1 == 2, "the failure to report"
"""
# Enough source that parsing it allocates past the threshold.
PADDING = "".join(f"value_{i} = [{i}, {{'key': ({i}, [{i}])}}]\n" for i in range(200))


def test_a_failure_is_reported_when_garbage_is_collected_while_showing_it(
    tmp_path: Path,
) -> None:
    test_file = tmp_path / "test_failing.py"
    test_file.write_text(FAILING_TEST + PADDING)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-c", str(PROJECT / "pyproject.toml"), "--rootdir", str(tmp_path)]
    command.append(str(test_file))
    for threshold in (2_000, 5_000):
        run = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={"GC_THRESHOLD": str(threshold), "PATH": "/usr/bin:/bin"},
            timeout=120,
        )
        assert "INTERNALERROR" not in run.stdout + run.stderr, run.stdout[-3000:]
        assert run.returncode == 1, run.stdout[-3000:]
        assert "the failure to report" in run.stdout
        assert "1 failed" in run.stdout
