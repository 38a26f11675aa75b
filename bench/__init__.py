"""Benchmark harness: pgbench against PostgreSQL directly, pg_doorman and PgBouncer.

Run ``python -m bench.run --help``. The method and the latest results are in
docs/benchmarks.md.
"""
