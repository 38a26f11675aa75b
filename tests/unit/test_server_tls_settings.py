"""server_tls_* resolved per pool: inheritance from [general], the key path named when a
file is unusable, and when a pool's servers count as opened differently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from pg_doorman.config import Config, parse_config
from pg_doorman.net.server_tls import PLAIN, ServerTls, server_tls_for
from pg_doorman.net.tls import TlsSetupError


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server-tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    out = {
        "ca": root / "ca.pem",
        "other_ca": root / "other.pem",
        "cert": root / "cert.pem",
        "key": root / "key.pem",
        "garbage": root / "garbage.pem",
    }
    ca.cert_pem.write_to_path(str(out["ca"]))
    trustme.CA().cert_pem.write_to_path(str(out["other_ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(out["cert"]))
    leaf.private_key_pem.write_to_path(str(out["key"]))
    out["garbage"].write_text("not a certificate\n")
    return out


def config(general: dict[str, Any], pool: dict[str, Any] | None = None) -> Config:
    return parse_config(
        {
            "general": {"host": "127.0.0.1", "port": 6432, **general},
            "pools": {
                "mydb": {
                    "users": [{"username": "alice", "password": "secret", "pool_size": 2}],
                    **(pool or {}),
                }
            },
        }
    )


def resolve(cfg: Config) -> ServerTls:
    return server_tls_for(cfg.general, cfg.pools["mydb"], "pools.mydb")


def test_the_default_is_allow_and_disable_is_plain() -> None:
    allow = resolve(config({}))
    assert allow.mode == "allow"
    assert allow.retries_over_tls and not allow.tls_first and not allow.required
    assert allow.context is not None  # for the retry over TLS
    assert resolve(config({"server_tls_mode": "disable"})) is PLAIN


def test_a_pool_overrides_general_key_by_key(files: dict[str, Path]) -> None:
    cfg = config(
        {"server_tls_mode": "disable", "server_tls_ca_cert": str(files["ca"])},
        {"server_tls_mode": "verify-full"},
    )
    tls = resolve(cfg)
    assert tls.mode == "verify-full" and tls.required and tls.tls_first
    assert tls.ca_cert == str(files["ca"])
    assert tls.context is not None and tls.context.check_hostname


def test_verify_ca_checks_the_chain_but_not_the_name(files: dict[str, Path]) -> None:
    tls = resolve(config({"server_tls_mode": "verify-ca", "server_tls_ca_cert": str(files["ca"])}))
    assert tls.context is not None
    assert not tls.context.check_hostname
    assert tls.context.verify_mode.name == "CERT_REQUIRED"
    require = resolve(config({"server_tls_mode": "require"}))
    assert require.context is not None and require.context.verify_mode.name == "CERT_NONE"


@pytest.mark.parametrize(
    ("general", "pool", "key"),
    [
        (
            {"server_tls_mode": "verify-ca", "server_tls_ca_cert": "/nonexistent/ca.pem"},
            {},
            "general.server_tls_ca_cert",
        ),
        (
            {"server_tls_mode": "verify-ca", "server_tls_ca_cert": "/nonexistent/ca.pem"},
            {"server_tls_ca_cert": "{garbage}"},
            "pools.mydb.server_tls_ca_cert",
        ),
        (
            {"server_tls_mode": "require"},
            {"server_tls_certificate": "{cert}", "server_tls_private_key": "/nonexistent/k"},
            "pools.mydb.server_tls_private_key",
        ),
        (
            {
                "server_tls_mode": "require",
                "server_tls_certificate": "{garbage}",
                "server_tls_private_key": "{key}",
            },
            {},
            "general.server_tls_certificate",
        ),
    ],
)
def test_an_unusable_file_names_its_key(
    files: dict[str, Path], general: dict[str, Any], pool: dict[str, Any], key: str
) -> None:
    names = {name: str(path) for name, path in files.items()}
    general = {k: v.format(**names) for k, v in general.items()}
    pool = {k: v.format(**names) for k, v in pool.items()}
    with pytest.raises(TlsSetupError) as caught:
        resolve(config(general, pool))
    assert caught.value.key == key


def test_a_renewed_file_is_a_change_and_an_unchanged_one_is_not(
    files: dict[str, Path], tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(files["ca"].read_bytes())
    cfg = config({"server_tls_mode": "verify-ca", "server_tls_ca_cert": str(ca)})
    first, again = resolve(cfg), resolve(cfg)
    assert first == again
    assert first.context is again.context  # one context shared by equal settings
    ca.write_bytes(files["other_ca"].read_bytes())
    renewed = resolve(cfg)
    assert renewed != first  # the pool's servers are replaced on reload
    assert renewed.context is not first.context
