#!/usr/bin/env bash
# Toolchains for tests/drivers: node-postgres and pg-cursor (npm registry, pinned by
# tests/drivers/node/package-lock.json), pgjdbc and pgx v4 (Debian).
# Idempotent and non-interactive; a toolchain that can't be installed makes its test skip.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=""
[ -e /usr/share/java/postgresql.jar ] || packages="$packages libpostgresql-jdbc-java"
command -v javac >/dev/null 2>&1 || packages="$packages default-jdk-headless"
command -v go >/dev/null 2>&1 || packages="$packages golang-go"
[ -d /usr/share/gocode/src/github.com/jackc/pgx/v4 ] || packages="$packages golang-github-jackc-pgx-v4-dev"
if [ -n "$packages" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages || echo "driver toolchains: apt-get failed; those tests will skip"
fi
if command -v npm >/dev/null 2>&1; then
    (cd tests/drivers/node && npm ci --no-audit --no-fund --loglevel=error) || echo "driver toolchains: npm ci failed; node test will skip"
fi
