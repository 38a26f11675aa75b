"""The TOML and YAML that `pg_doorman generate` writes read back as what it was given,
whatever the names of the databases and roles."""

from __future__ import annotations

import tomllib

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_doorman.app.generated_config import GeneratedConfig, GeneratedUser, render


def _config(database: str, user: str, password: str) -> GeneratedConfig:
    return GeneratedConfig(
        source="db.example:5432",
        server_host="db.example",
        server_port=5432,
        databases=(database, "postgres"),
        users=(GeneratedUser(user, password),),
        pool_mode="transaction",
        pool_size=40,
        admin_password="secret",
        server_tls=False,
    )


@settings(max_examples=300, deadline=None)
@given(
    database=st.text(min_size=1).filter(lambda name: name != "postgres"),
    user=st.text(min_size=1),
    password=st.text(),
    comments=st.booleans(),
)
def test_names_round_trip_in_both_formats(
    database: str, user: str, password: str, comments: bool
) -> None:
    config = _config(database, user, password)
    for parsed in (
        tomllib.loads(render(config, "toml", comments)),
        yaml.safe_load(render(config, "yaml", comments)),
    ):
        assert list(parsed["pools"]) == [database, "postgres"]
        for pool in parsed["pools"].values():
            assert pool["users"] == [{"username": user, "password": password, "pool_size": 40}]
            assert pool["server_host"] == "db.example"


def test_no_comments_means_none() -> None:
    text = render(_config("app", "app", "md5" + "0" * 32), "toml", comments=False)
    assert not [line for line in text.splitlines() if line.lstrip().startswith("#")]
