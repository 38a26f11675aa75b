"""Which implementation of the hot-path modules runs: compiled or pure Python.

The modules in `COMPILED_MODULES` can be compiled with mypyc (`make compiled`) into
extension modules next to their sources. The sources stay the reference and the
fallback; the compiled build is the same code, about twice as fast. The build also holds
the small C helpers in `C_HELPERS`, used only with the compiled modules. `PG_DOORMAN_IMPL`
picks one:

- `auto` (default): the compiled build when one matching the sources is present;
- `compiled`: the compiled build, or refuse to start and say why;
- `python`: the sources, even when a compiled build is present.

A build records a hash of every source it compiled (`compiled-manifest.json`). A build
whose sources changed since is stale and never used: running old code after an edit is
the bug this guards against.

This module runs from the package's `__init__` and must stay pure Python.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

ENV = "PG_DOORMAN_IMPL"
CHOICES = ("auto", "compiled", "python")
MANIFEST = "compiled-manifest.json"

# The modules on the per-message and per-transaction path, compiled together.
COMPILED_MODULES: tuple[str, ...] = (
    "pg_doorman.auth.methods",
    "pg_doorman.auth.scram",
    "pg_doorman.memo",
    "pg_doorman.protocol.codes",
    "pg_doorman.protocol.framing",
    "pg_doorman.protocol.messages",
    "pg_doorman.protocol.text_effects",
    "pg_doorman.protocol.startup",
    "pg_doorman.app.dispatch",
    "pg_doorman.net.client",
    "pg_doorman.net.ids",
    "pg_doorman.net.inbox",
    "pg_doorman.net.server",
    "pg_doorman.net.writer",
    "pg_doorman.pool.pool",
    "pg_doorman.prepared.registry",
    "pg_doorman.prepared.rewriter",
    "pg_doorman.stats.counters",
)

# Helpers written in C, built with the modules above: what the standard library lacks
# on the hot path (net/_send.c: a socket send that keeps the GIL; net/_resume.c: a
# coroutine step that ends without StopIteration; protocol/_text_effects.c: substring
# tests without bytes.find's argument parsing). They have no Python source; with the
# sources (`python`) their callers use the library instead.
C_HELPERS: tuple[str, ...] = (
    "pg_doorman.net._send",
    "pg_doorman.net._resume",
    "pg_doorman.protocol._text_effects",
)

# Everything a build holds, each with its source's digest in the manifest.
BUILT_MODULES: tuple[str, ...] = COMPILED_MODULES + C_HELPERS

PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The source a build compiles for `module`: its `.py` file, or `.c` for a helper."""
    parts = module.split(".")[1:]
    suffix = ".c" if module in C_HELPERS else ".py"
    return package_dir.joinpath(*parts[:-1], parts[-1] + suffix)


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(package_dir: Path = PACKAGE_DIR) -> str:
    """The manifest a build of the sources in `package_dir` records (JSON text)."""
    digests = {module: source_digest(source_path(module, package_dir)) for module in BUILT_MODULES}
    document = {"sources": digests, "python": sys.implementation.cache_tag}
    return json.dumps(document, indent=2) + "\n"


def _extension_of(source: Path) -> Path | None:
    """The extension module this interpreter would load instead of `source`."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def build_problem(package_dir: Path = PACKAGE_DIR) -> str | None:
    """Why the compiled build can't be used, or None when it matches the sources."""
    manifest_path = package_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        digests = manifest["sources"]
    except FileNotFoundError:
        return "no compiled build is present"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path.name} is unreadable ({exc})"
    for module in BUILT_MODULES:
        source = source_path(module, package_dir)
        if _extension_of(source) is None:
            return f"{module} is not compiled for this Python ({sys.implementation.cache_tag})"
        try:
            current = source_digest(source)
        except OSError as exc:
            return f"cannot read {source.name}: {exc}"
        if digests.get(module) != current:
            return f"the compiled build is stale: {module} changed since it was built"
    return None


class SourceFinder:
    """Import finder that loads the listed modules from their `.py` files, which
    the default finder would skip in favour of an extension module beside them."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname not in self.modules or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path:
            candidate = os.path.join(entry, leaf)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


def env_choice(
    environ: Mapping[str, str],
    name: str,
    choices: Sequence[str],
    error: type[Exception],
) -> str:
    """The value of the variable `name`, normalised, `auto` when unset; `error` naming
    the choices when it is none of them."""
    wanted = environ.get(name, "").strip().lower() or "auto"
    if wanted not in choices:
        raise error(f"{name}={environ[name]!r}: expected one of {', '.join(choices)}")
    return wanted


def select(environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """Install the choice; returns (`compiled` or `python`, why not compiled or None)."""
    wanted = env_choice(environ, ENV, CHOICES, ImportError)
    if wanted == "python":
        problem: str | None = f"{ENV}=python"
    else:
        problem = build_problem()
        if problem is not None and wanted == "compiled":
            raise ImportError(f"{ENV}=compiled, but {problem}: run `make compiled`")
    if problem is None:
        return "compiled", None
    if not any(isinstance(finder, SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder(COMPILED_MODULES))
    return "python", problem


def loaded() -> str:
    """What actually runs: `compiled` when the framing module came from an extension."""
    from pg_doorman.protocol import framing

    return "python" if (framing.__file__ or "").endswith(".py") else "compiled"


ACTIVE, REASON = select()


def describe() -> str:
    """For the startup log line."""
    if loaded() == "compiled":
        return "compiled hot path"
    return f"pure-Python hot path: {REASON}" if REASON else "pure-Python hot path"
