"""Packaging hook for the optional compiled hot path.

`pip install .` builds the pure-Python package. `PG_DOORMAN_COMPILE=1 pip install .`
(with mypy, a C compiler and the Python headers available) also compiles the modules in
`pg_doorman.implementation.COMPILED_MODULES` with mypyc and the C helpers in `C_HELPERS`,
and ships them beside their sources, with the manifest that lets the package check the
two match.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
COMPILE = os.environ.get("PG_DOORMAN_COMPILE", "") == "1"


def _implementation() -> Any:
    # Load the list without importing the package (which would select an implementation).
    import importlib.util

    path = HERE / "src" / "pg_doorman" / "implementation.py"
    spec = importlib.util.spec_from_file_location("_pg_doorman_implementation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved = os.environ.get("PG_DOORMAN_IMPL")
    os.environ["PG_DOORMAN_IMPL"] = "python"  # no build is needed to read the list
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["PG_DOORMAN_IMPL"]
        else:
            os.environ["PG_DOORMAN_IMPL"] = saved
    return module


class BuildPyWithManifest(build_py):
    """Writes the manifest of compiled sources into the built package."""

    def run(self) -> None:
        super().run()
        impl = _implementation()
        target = Path(self.build_lib) / "pg_doorman" / impl.MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(impl.manifest(HERE / "src" / "pg_doorman"))


if COMPILE:
    from mypyc.build import mypycify
    from setuptools import Extension

    impl = _implementation()
    package = Path("src") / "pg_doorman"
    sources = [str(impl.source_path(module, package)) for module in impl.COMPILED_MODULES]
    setup(
        ext_modules=[
            *mypycify(sources, opt_level="3"),
            *(
                Extension(module, [str(impl.source_path(module, package))])
                for module in impl.C_HELPERS
            ),
        ],
        cmdclass={"build_py": BuildPyWithManifest},
    )
else:
    setup()
