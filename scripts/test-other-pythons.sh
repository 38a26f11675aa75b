#!/usr/bin/env bash
# The other Pythons the package supports (3.12 and 3.13; `make test` runs on 3.11): on
# each one found, build the compiled hot path and run the whole test suite on the
# compiled build (with the packaging test: the compiled wheel built, installed and run
# on that interpreter), and the unit tests and the tests of the event loops on the
# sources. The versions run side by side.
#
#     bash scripts/test-other-pythons.sh            # 3.12 and 3.13
#     PYTHON_VERSIONS=3.13 bash scripts/test-other-pythons.sh
#
# The work happens in copies of the checkout (tracked files and new ones not ignored),
# one per version, because a compiled build replaces the one beside the sources; each
# interpreter gets a virtualenv of its own, kept in .venv-3.X for the next run. An
# interpreter is looked for as `python3.X` on PATH, then among pyenv's versions; one
# that is not found is reported and skipped, and REQUIRE_ALL=1 makes that a failure.
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
    tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null >"$work/checkout.tar"

# One version's whole run, in its own copy of the checkout: a compiled build replaces
# the one beside the sources, so two versions cannot share a copy.
run_version() {
    local version=$1 python=$2 copy="$work/$version" venv="$root/.venv-$version"
    mkdir -p "$copy" && tar -xf "$work/checkout.tar" -C "$copy"
    # node-postgres, installed by scripts/install-driver-toolchains.sh, is ignored by git.
    local node_modules=tests/drivers/node/node_modules
    [ ! -d "$root/$node_modules" ] || ln -s "$root/$node_modules" "$copy/$node_modules"
    echo "==> Python $version ($python, .venv-$version)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$copy[test]"
    make --no-print-directory -C "$copy" compiled PYTHON="$venv/bin/python" >"$copy/compile.log" 2>&1 ||
        { cat "$copy/compile.log"; return 1; }
    tail -n 1 "$copy/compile.log"
    # TEST_TMP gives each pytest a temporary directory of its own, as under `make test`:
    # the shared default would cut the other version's PostgreSQL off from its data.
    mkdir "$copy/tmp"
    make --no-print-directory -C "$copy" test-compiled PYTHON="$venv/bin/python" TEST_TMP="$copy/tmp"
    cd "$copy"
    PG_DOORMAN_IMPL=python "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --basetemp="$copy/tmp/python" tests/unit tests/integration/test_event_loops.py
}

# The versions run side by side, like the two builds under `make test`: most of a run
# is spent waiting on servers and timeouts. Each one's output is printed when it ends.
missing=0
pids=()
versions=()
for version in ${PYTHON_VERSIONS:-3.12 3.13}; do
    if ! python=$(find_python "$version"); then
        echo "Python $version: not found, skipped"
        missing=1
        continue
    fi
    (run_version "$version" "$python") >"$work/$version.log" 2>&1 &
    pids+=("$!")
    versions+=("$version")
done

failed=0
for i in "${!pids[@]}"; do
    status=0
    wait "${pids[$i]}" || status=$?
    cat "$work/${versions[$i]}.log"
    if [ "$status" != 0 ]; then
        echo "==> Python ${versions[$i]}: failed (exit $status)"
        failed=1
    fi
done
[ "$failed" = 0 ] || exit 1

if [ "$missing" = 1 ] && [ "${REQUIRE_ALL:-0}" = 1 ]; then
    echo "REQUIRE_ALL=1: a supported Python was not found"
    exit 1
fi
