"""How many seeds the random parity tests run.

Each runs a fixed range of seeds, so that a failure repeats. `PG_DOORMAN_TEST_SEEDS=<n>`
multiplies the range for a deeper search; the default seeds stay its first ones.
"""

from __future__ import annotations

import os

ENV = "PG_DOORMAN_TEST_SEEDS"


def seeds(default: int) -> range:
    """The first `default` seeds, times the factor in PG_DOORMAN_TEST_SEEDS (1 when unset)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return range(default)
    try:
        factor = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a whole number, got {raw!r}") from None
    if factor < 1:
        raise ValueError(f"{ENV} must be at least 1, got {factor}")
    return range(default * factor)
