"""Settings the pooler refuses or warns about: documented PgDoorman keys it does not
act on, zero timeouts that would fail every login, unknown keys with their path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pg_doorman.config.loader import ConfigError, load_config, parse_config

USER = {"username": "u", "password": ""}


def _pool(**keys: Any) -> dict[str, Any]:
    return {"pools": {"db": {"users": [dict(USER)], **keys}}}


# PgDoorman settings nothing here acts on: setting one warns, as nothing in the file
# is ignored silently.
@pytest.mark.parametrize(
    ("data", "key_path"),
    [
        ({"general": {"worker_threads": 8}}, "general.worker_threads"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_documented_keys_nothing_reads_warn_when_set(data: dict[str, Any], key_path: str) -> None:
    data = {**_pool(), **data}
    config = parse_config(data)
    assert any(w.startswith(f"{key_path}:") for w in config.warnings), config.warnings


@pytest.mark.parametrize(
    "general", [{"query_wait_timeout": 0}, {"connect_timeout": "0s"}], ids=["wait", "connect"]
)
def test_zero_wait_and_connect_timeouts_are_refused(general: dict[str, Any]) -> None:
    key = next(iter(general))
    with pytest.raises(ConfigError) as info:
        parse_config({"general": general, **_pool()})
    assert info.value.key_path == f"general.{key}"


def test_zero_pool_connect_timeout_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_pool(connect_timeout=0))
    assert info.value.key_path == "pools.db.connect_timeout"


def test_unknown_keys_in_yaml_users_and_talos_warn_with_the_path(tmp_path: Path) -> None:
    """Unknown keys warn (documented), with their path, in YAML too."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "general:\n  prot: 1\n"
        "pools:\n  mydb:\n    users:\n      - username: u\n        password: ''\n"
        "        pool_sise: 3\n"
        "talos:\n  key: []\n"
        "prometheus:\n  enable: true\n"
    )
    config = load_config(path)
    for key in (
        "general.prot",
        "pools.mydb.users[0].pool_sise",
        "talos.key",
        "prometheus.enable",
    ):
        assert any(w.startswith(f"{key}: unknown key") for w in config.warnings), key
