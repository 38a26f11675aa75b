"""Choosing between the compiled hot path and the sources (PG_DOORMAN_IMPL)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pg_doorman import implementation
from pg_doorman.implementation import (
    BUILT_MODULES,
    ENV,
    MANIFEST,
    SourceFinder,
    build_problem,
    source_digest,
    source_path,
)

SRC = Path(implementation.__file__).resolve().parents[1]
EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_build(package_dir: Path) -> None:
    """Sources, an (empty) extension file beside each, and a matching manifest."""
    digests = {}
    for module in BUILT_MODULES:
        source = source_path(module, package_dir)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {module}\n")
        source.with_name(source.stem + EXTENSION).write_bytes(b"")
        digests[module] = source_digest(source)
    (package_dir / MANIFEST).write_text(json.dumps({"sources": digests}))


def test_matching_build_is_usable(tmp_path: Path) -> None:
    fake_build(tmp_path)
    assert build_problem(tmp_path) is None


def test_no_manifest_means_no_build(tmp_path: Path) -> None:
    fake_build(tmp_path)
    (tmp_path / MANIFEST).unlink()
    assert build_problem(tmp_path) == "no compiled build is present"


def test_edited_source_makes_the_build_stale(tmp_path: Path) -> None:
    fake_build(tmp_path)
    source = source_path("pg_doorman.net.client", tmp_path)
    source.write_text(source.read_text() + "# edited\n")
    problem = build_problem(tmp_path)
    assert problem is not None
    assert "stale" in problem and "pg_doorman.net.client" in problem


def test_missing_extension_is_named(tmp_path: Path) -> None:
    fake_build(tmp_path)
    source = source_path("pg_doorman.pool.pool", tmp_path)
    source.with_name(source.stem + EXTENSION).unlink()
    problem = build_problem(tmp_path)
    assert problem is not None
    assert "pg_doorman.pool.pool is not compiled" in problem


def test_the_c_helpers_belong_to_the_build(tmp_path: Path) -> None:
    fake_build(tmp_path)
    helper = source_path("pg_doorman.net._send", tmp_path)
    assert helper.suffix == ".c"
    helper.write_text(helper.read_text() + "/* edited */\n")
    problem = build_problem(tmp_path)
    assert problem is not None and "stale" in problem and "pg_doorman.net._send" in problem
    fake_build(tmp_path)
    helper.with_name(helper.stem + EXTENSION).unlink()
    problem = build_problem(tmp_path)
    assert problem is not None and "pg_doorman.net._send is not compiled" in problem


def test_unreadable_manifest_is_named(tmp_path: Path) -> None:
    fake_build(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    problem = build_problem(tmp_path)
    assert problem is not None and MANIFEST in problem


def test_invalid_choice_names_the_variable() -> None:
    with pytest.raises(ImportError, match=r"PG_DOORMAN_IMPL='fast': expected one of"):
        implementation.select({ENV: "fast"})


def test_source_finder_loads_the_py_file(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text("VALUE = 1\n")
    finder = SourceFinder(["pkg.mod"])
    spec = finder.find_spec("pkg.mod", [str(package)])
    assert spec is not None and spec.origin == str(package / "mod.py")
    assert finder.find_spec("pkg.other", [str(package)]) is None
    assert finder.find_spec("pkg.mod", None) is None


def _import_in_child(env_value: str, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import importlib, pg_doorman\n"
        "from pg_doorman import implementation as i\n"
        "files = {m: importlib.import_module(m).__file__ for m in i.COMPILED_MODULES}\n"
        "print(i.ACTIVE, i.loaded())\n"
        "print(*sorted({f.rsplit('.', 1)[-1] for f in files.values()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(pythonpath), **{ENV: env_value})
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_python_choice_loads_every_module_from_source() -> None:
    result = _import_in_child("python", SRC)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["python python", "py"]


def test_compiled_choice_loads_extensions_or_refuses() -> None:
    result = _import_in_child("compiled", SRC)
    problem = build_problem()
    if problem is None:
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:2] == ["compiled compiled", "so"]
    else:
        assert result.returncode != 0
        assert f"PG_DOORMAN_IMPL=compiled, but {problem}: run `make compiled`" in result.stderr


def test_sources_without_a_build(tmp_path: Path) -> None:
    """A tree with no build: `auto` runs the sources, `compiled` refuses and says why."""
    shutil.copytree(
        SRC / "pg_doorman",
        tmp_path / "pg_doorman",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", MANIFEST, "__pycache__"),
    )
    auto = _import_in_child("auto", tmp_path)
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.split("\n")[:2] == ["python python", "py"]
    refused = _import_in_child("compiled", tmp_path)
    assert refused.returncode != 0
    assert "PG_DOORMAN_IMPL=compiled, but no compiled build is present" in refused.stderr


def test_this_run_uses_what_it_asked_for() -> None:
    wanted = os.environ.get(ENV, "auto")
    expected = {
        "compiled": "compiled",
        "python": "python",
        "auto": "compiled" if build_problem() is None else "python",
    }[wanted]
    assert implementation.loaded() == expected
