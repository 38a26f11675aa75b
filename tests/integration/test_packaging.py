"""The compiled build as users install it: `PG_DOORMAN_COMPILE=1 pip wheel .`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pg_doorman.implementation import COMPILED_MODULES, ENV, MANIFEST

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_wheel_installs_and_runs_compiled(tmp_path: Path) -> None:
    if os.environ.get(ENV) == "python":
        pytest.skip("packaging is checked once, in the compiled run")
    # A copy of the sources alone: the build writes its C files next to setup.py.
    tree = tmp_path / "tree"
    shutil.copytree(
        REPO / "src",
        tree / "src",
        ignore=shutil.ignore_patterns("*.so", MANIFEST, "__pycache__", "*.egg-info", "build"),
    )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    build += ["--quiet", "-w", str(wheels), str(tree)]
    env = dict(os.environ, PG_DOORMAN_COMPILE="1")
    done = subprocess.run(build, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("pg_doorman-*.whl")
    assert "cp3" in wheel.name  # a platform wheel, not a pure-Python one

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    install += ["--target", str(site), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    code = (
        "import importlib\n"
        "from pg_doorman import implementation as i\n"
        "print(i.describe())\n"
        "for m in i.COMPILED_MODULES:\n"
        "    print(importlib.import_module(m).__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site), **{ENV: "compiled"})
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "compiled hot path"
    assert len(lines[1:]) == len(COMPILED_MODULES)
    assert all(line.startswith(str(site)) and line.endswith(".so") for line in lines[1:])

    check = [sys.executable, "-m", "pg_doorman", "-t", str(REPO / "pg_doorman.toml")]
    run = subprocess.run(check, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
