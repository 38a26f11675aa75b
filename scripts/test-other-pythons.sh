#!/usr/bin/env bash
# The other Pythons the package supports (3.12 and 3.13; `make test` runs on 3.11): on
# each one found, build the compiled hot path and run the unit tests and the tests of
# the event loops on both builds, plus, on the compiled build, the packaging test (the
# compiled wheel built, installed and run on that interpreter) and the integration
# tests that put the Python drivers, the prepared-statement rewriting, logins, TLS and
# the protocol's edges through the pooler (the rest of the integration suite runs on
# 3.11).
#
#     bash scripts/test-other-pythons.sh            # 3.12 and 3.13
#     PYTHON_VERSIONS=3.13 bash scripts/test-other-pythons.sh
#
# The work happens in a copy of the checkout (tracked files and new ones not ignored),
# because a compiled build replaces the one beside the sources; each interpreter gets a
# virtualenv of its own, kept in .venv-3.X for the next run. An interpreter is looked
# for as `python3.X` on PATH, then among pyenv's versions; one that is not found is
# reported and skipped, and REQUIRE_ALL=1 makes that a failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

find_python() {
    local version=$1 candidate
    if command -v "python$version" >/dev/null 2>&1 && "python$version" -c '' 2>/dev/null; then
        echo "python$version"
        return 0
    fi
    # pyenv's shims answer for the selected versions only: look at the installs.
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for candidate in "$pyenv_root"/versions/"$version".*/bin/"python$version"; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/pg_doorman-pythons.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Files deleted in the working tree are still listed by git: tar skips them.
git ls-files -z --cached --others --exclude-standard |
    tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$work"

drivers_and_protocol=(
    tests/integration/test_pooling.py
    tests/integration/test_prepared.py
    tests/integration/test_parity.py
    tests/integration/test_auth.py
    tests/integration/test_tls.py
    tests/integration/test_startup.py
    tests/integration/test_protocol_edges.py
    tests/integration/test_transaction_edges.py
    tests/integration/test_session_parameters.py
)

missing=0
for version in ${PYTHON_VERSIONS:-3.12 3.13}; do
    if ! python=$(find_python "$version"); then
        echo "Python $version: not found, skipped"
        missing=1
        continue
    fi
    venv="$root/.venv-$version"
    echo "==> Python $version ($python, .venv-$version)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$work[test]"
    make --no-print-directory -C "$work" compiled PYTHON="$venv/bin/python" >"$work/compile-$version.log" 2>&1 ||
        { cat "$work/compile-$version.log"; exit 1; }
    tail -n 1 "$work/compile-$version.log"
    (
        cd "$work"
        PG_DOORMAN_IMPL=compiled "$venv/bin/python" -m pytest -q -p no:cacheprovider \
            tests/unit tests/integration/test_event_loops.py tests/integration/test_packaging.py \
            "${drivers_and_protocol[@]}"
        PG_DOORMAN_IMPL=python "$venv/bin/python" -m pytest -q -p no:cacheprovider \
            tests/unit tests/integration/test_event_loops.py
    )
done

if [ "$missing" = 1 ] && [ "${REQUIRE_ALL:-0}" = 1 ]; then
    echo "REQUIRE_ALL=1: a supported Python was not found"
    exit 1
fi
