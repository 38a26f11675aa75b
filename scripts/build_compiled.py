"""Compile the hot-path modules with mypyc, in place beside their sources.

    python scripts/build_compiled.py           build (replacing any earlier build)
    python scripts/build_compiled.py --clean   remove the build: the sources run

Needs mypy (the `test` or `compiled` extra), setuptools, a C compiler and the Python
headers. The list of modules is `pg_doorman.implementation.COMPILED_MODULES`, plus the C
helpers in `C_HELPERS`; the manifest written last records the hash of each compiled
source, so a later edit makes the build stale and the package falls back to the sources
instead of running old code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "pg_doorman"

sys.path.insert(0, str(SRC))
os.environ["PG_DOORMAN_IMPL"] = "python"  # importing the list must not need a build

from pg_doorman.implementation import (  # noqa: E402
    C_HELPERS,
    COMPILED_MODULES,
    MANIFEST,
    manifest,
    source_path,
)


def clean() -> None:
    (PACKAGE / MANIFEST).unlink(missing_ok=True)
    for pattern in ("**/*.so", "**/*.pyd"):
        for path in PACKAGE.glob(pattern):
            path.unlink()
    # mypyc's shared runtime for the group lands at the top of the source tree.
    for path in SRC.glob("*__mypyc*"):
        path.unlink()
    shutil.rmtree(SRC / "build", ignore_errors=True)


def build_c_helpers() -> None:
    """Compile the C helpers in place, as setuptools builds any extension module."""
    helpers = [[module, str(source_path(module, PACKAGE).relative_to(SRC))] for module in C_HELPERS]
    code = (
        "import json, sys\n"
        "from setuptools import Extension, setup\n"
        "helpers = [Extension(name, [path]) for name, path in json.loads(sys.argv[1])]\n"
        "setup(name='pg-doorman-c-helpers', ext_modules=helpers,\n"
        "      script_args=['-q', 'build_ext', '--inplace', '--build-temp', 'build/c'])\n"
    )
    argv = [sys.executable, "-c", code, json.dumps(helpers)]
    print("+ build_ext --inplace", " ".join(path for _, path in helpers), flush=True)
    subprocess.run(argv, cwd=SRC, check=True)


def build() -> None:
    clean()
    sources = [source_path(module, PACKAGE) for module in COMPILED_MODULES]
    before = manifest(PACKAGE)
    env = dict(os.environ, MYPYC_OPT_LEVEL=os.environ.get("MYPYC_OPT_LEVEL", "3"))
    argv = [sys.executable, "-m", "mypyc", *(str(p.relative_to(SRC)) for p in sources)]
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=SRC, env=env, check=True)
    build_c_helpers()
    after = manifest(PACKAGE)
    if after != before:
        clean()
        raise SystemExit("sources changed while compiling; run the build again")
    (PACKAGE / MANIFEST).write_text(after)
    shutil.rmtree(SRC / "build", ignore_errors=True)
    built = f"{len(sources)} modules and {len(C_HELPERS)} C helper(s)"
    print(f"compiled {built}; manifest: {(PACKAGE / MANIFEST).relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled build")
    args = parser.parse_args()
    if args.clean:
        clean()
        print("compiled build removed")
    else:
        build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
