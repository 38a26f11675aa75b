"""The tls-server-end-point data SCRAM-SHA-256-PLUS binds a login to (RFC 5929): the
certificate's hash with the hash function of its signature (SHA-256 for MD5 and SHA-1,
not tested: OpenSSL 3 refuses to sign with them), none for a signature without a hash
function."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from pg_doorman.config.schema import GeneralConfig
from pg_doorman.net.tls import client_tls_context, tls_end_point


def write_certificate(
    directory: Path, key: CertificateIssuerPrivateKeyTypes, algorithm: hashes.HashAlgorithm | None
) -> tuple[Path, Path, bytes]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("signed_with", "hashed_with"),
    [
        (hashes.SHA256(), hashlib.sha256),
        (hashes.SHA384(), hashlib.sha384),
        (hashes.SHA512(), hashlib.sha512),
    ],
)
def test_the_end_point_is_the_certificates_hash(
    tmp_path: Path, signed_with: hashes.HashAlgorithm, hashed_with: Callable[[bytes], Any]
) -> None:
    cert, key, der = write_certificate(
        tmp_path, ec.generate_private_key(ec.SECP256R1()), signed_with
    )
    context = client_tls_context(GeneralConfig(tls_certificate=str(cert), tls_private_key=str(key)))
    assert context is not None
    assert tls_end_point(context) == hashed_with(der).digest()


def test_a_signature_without_a_hash_function_allows_no_binding(tmp_path: Path) -> None:
    cert, key, _ = write_certificate(tmp_path, ed25519.Ed25519PrivateKey.generate(), None)
    context = client_tls_context(GeneralConfig(tls_certificate=str(cert), tls_private_key=str(key)))
    assert context is not None  # TLS is offered, SCRAM-SHA-256-PLUS is not
    assert tls_end_point(context) is None
