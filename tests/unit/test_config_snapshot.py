"""The configuration snapshot a reload hands to every worker (app.cluster)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pg_doorman.app.cluster import read_config_snapshot, write_config_snapshot
from pg_doorman.config import ConfigError, parse_config

CONFIG = {
    "general": {"host": "127.0.0.1", "port": 6432, "pg_hba": "host all all 0.0.0.0/0 md5"},
    "pools": {"app": {"pool_mode": "transaction", "users": [{"username": "u", "password": "p"}]}},
}


def test_a_snapshot_reads_back_as_the_same_config_until_the_next_one(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    first = write_config_snapshot(str(tmp_path), config)
    assert read_config_snapshot(first) == config
    second = write_config_snapshot(str(tmp_path), config)
    assert second != first  # each reload its own file
    assert read_config_snapshot(second) == config
    assert [p.name for p in tmp_path.iterdir()] == [Path(second).name]


@pytest.mark.parametrize(
    "content",
    [b"", pickle.dumps(CONFIG)[:20], pickle.dumps({"not": "a config"})],
    ids=["empty", "truncated", "another-object"],
)
def test_a_bad_snapshot_is_a_config_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config-1-0.pickle"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"config-1-0\.pickle"):
        read_config_snapshot(str(path))


def test_a_missing_snapshot_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_snapshot(str(tmp_path / "gone.pickle"))
