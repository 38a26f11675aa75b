"""The login under bad or hostile input: malformed startup packets, encryption
requests, SCRAM and md5 exchanges out of shape, oversized messages, pg_hba refusals,
unknown users, half-open logins.

Each test drives the real pooler process with raw protocol bytes and, where the
answer is PostgreSQL's to copy, sends the same bytes to the real PostgreSQL too.
"""

from __future__ import annotations

import base64
import hmac
import socket
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess, Replace, serve_a_client
from pg_doorman.auth.mock_auth import MOCK_AUTH_SECRET_ENV

PROTOCOL = struct.Struct("!ii")


def raw(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=5)


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the peer closes; raises TimeoutError if it stays open."""
    sock.settimeout(timeout)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"still open after {timeout}s; got {bytes(data)!r}")
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise TimeoutError(f"still open after {timeout}s; got {bytes(data)!r}") from None
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_reply(sock: socket.socket, wait: float) -> bytes:
    """What arrives within `wait` seconds or until the peer closes."""
    sock.settimeout(wait)
    data = bytearray()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def messages_of(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def fatal_of(data: bytes) -> dict[str, str]:
    errors = [w.error_fields(p) for t, p in messages_of(data) if t == b"E"]
    assert errors, f"no ErrorResponse in {data!r}"
    return errors[0]


def no_traceback(proc: PoolerProcess) -> None:
    log = proc.log_text()
    assert "Traceback" not in log, proc.log_tail()
    assert "internal error" not in log, proc.log_tail()


def startup_packet(body: bytes, code: int = 196608) -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


# ---- malformed startup -------------------------------------------------------------


@pytest.mark.parametrize("version", [(2, 0), (4, 0), (1, 0), (0, 0)])
def test_unsupported_major_protocol_is_0a000_as_in_postgresql(
    pg: ExamplePostgres, pooler: PoolerFactory, version: tuple[int, int]
) -> None:
    proc = pooler()
    code = (version[0] << 16) | version[1]
    packet = startup_packet(b"user\x00" + pg.md5_user.name.encode() + b"\x00\x00", code)
    replies = {}
    for name, (host, port) in {"pooler": (proc.host, proc.port), "pg": (pg.host, pg.port)}.items():
        with raw(host, port) as sock:
            sock.sendall(packet)
            replies[name] = read_all(sock)
    if version[0] > 3:  # PostgreSQL answers older versions in their own format
        assert fatal_of(replies["pg"])["C"] == "0A000"
    assert fatal_of(replies["pooler"])["C"] == "0A000", replies
    assert fatal_of(replies["pooler"])["S"] == "FATAL"
    serve_a_client(proc, pg)


@pytest.mark.parametrize(
    "body",
    [
        b"user\x00someone\x00",  # no closing empty name
        b"user\x00someone",  # value not NUL-terminated
        b"user",  # name not NUL-terminated
        b"",  # no parameters, no terminator
        b"user\x00someone\x00\x00junk",  # bytes after the terminator
    ],
)
def test_parameter_list_not_terminated_is_08p01(
    pg: ExamplePostgres, pooler: PoolerFactory, body: bytes
) -> None:
    proc = pooler()
    with raw(proc.host, proc.port) as sock:
        sock.sendall(startup_packet(body))
        fields = fatal_of(read_all(sock))
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    serve_a_client(proc, pg)


def test_second_ssl_request_after_n_is_refused_as_postgresql_does(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """PostgreSQL answers the first SSLRequest with N, and the second with FATAL 0A000
    (it reads it as protocol 1234.5679). A client looping on SSLRequests gets an error,
    not an endless series of N."""
    proc = pooler()
    replies = {}
    for name, (host, port) in {"pooler": (proc.host, proc.port), "pg": (pg.host, pg.port)}.items():
        with raw(host, port) as sock:
            sock.sendall(w.ssl_request())
            assert sock.recv(1) == b"N", name
            sock.sendall(w.ssl_request())
            replies[name] = read_reply(sock, 3)
    pg_error = fatal_of(replies["pg"])
    assert pg_error["C"] == "0A000"
    assert replies["pooler"][:1] != b"N", "a second SSLRequest answered N again"
    assert fatal_of(replies["pooler"])["C"] == "0A000"


def test_gssenc_request_twice_is_refused_as_postgresql_does(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    replies = {}
    for name, (host, port) in {"pooler": (proc.host, proc.port), "pg": (pg.host, pg.port)}.items():
        with raw(host, port) as sock:
            sock.sendall(w.gssenc_request())
            assert sock.recv(1) == b"N", name
            sock.sendall(w.gssenc_request())
            replies[name] = read_reply(sock, 3)
    assert fatal_of(replies["pg"])["C"] == "0A000"
    assert replies["pooler"][:1] != b"N", "a second GSSENCRequest answered N again"


@pytest.mark.parametrize("request_kind", ["ssl", "gssenc"])
def test_plaintext_after_ssl_request_in_the_same_packet_is_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, request_kind: str
) -> None:
    """CVE-2021-23214: bytes buffered behind an SSLRequest (without a certificate the
    answer is N) must not be read as the startup packet."""
    proc = pooler()
    request = w.ssl_request() if request_kind == "ssl" else w.gssenc_request()
    injected = w.startup_message({"user": pg.trust_user.name, "database": "example_db"})
    with raw(proc.host, proc.port) as sock:
        sock.sendall(request + injected)
        reply = read_all(sock)
    # PostgreSQL answers N, then refuses; refusing at once is as good.
    fields = fatal_of(reply[1:] if reply[:1] == b"N" else reply)
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert b"R\x00\x00\x00\x08\x00\x00\x00\x00" not in reply  # never AuthenticationOk
    no_traceback(proc)


@pytest.mark.parametrize("length", [8, 12, 20, 100])
def test_cancel_request_of_the_wrong_length(
    pg: ExamplePostgres, pooler: PoolerFactory, length: int
) -> None:
    proc = pooler()
    with raw(proc.host, proc.port) as sock:
        body = struct.pack("!i", 80877102) + b"\x00" * (length - 8)
        sock.sendall(struct.pack("!i", length) + body)
        started = time.monotonic()
        reply = read_all(sock)
        assert time.monotonic() - started < 2
    if reply:
        assert fatal_of(reply)["C"] == "08P01"
    no_traceback(proc)
    serve_a_client(proc, pg)


# ---- SCRAM ---------------------------------------------------------------------------


def sasl_started(proc: PoolerProcess, user: str) -> w.PgWire:
    """A connection whose startup packet is answered with AuthenticationSASL."""
    conn = w.PgWire(proc.host, proc.port)
    conn.send_raw(w.startup_message({"user": user, "database": "example_db"}))
    kind, payload = conn.read_message()
    assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_SASL)
    assert payload[4:] == b"SCRAM-SHA-256\x00\x00"
    return conn


def server_first(conn: w.PgWire, client: w.ScramClient, gs2: bytes = b"n,,") -> bytes:
    conn.send_raw(w.sasl_initial_response("SCRAM-SHA-256", gs2 + client.client_first_bare.encode()))
    kind, payload = conn.read_message()
    assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_SASL_CONTINUE), payload
    return payload[4:]


def refusal(conn: w.PgWire) -> w.ServerError:
    received = conn.wait_closed(timeout=5)
    error = w.first_error(received)
    assert error is not None, received
    assert error.severity == "FATAL"
    assert not [m for m in received if m[0] == b"R" and m[1][:4] == b"\x00\x00\x00\x00"]
    return error


def final_with(first: bytes, client: w.ScramClient, **replace: str) -> bytes:
    """A correct client-final-message with some attributes replaced."""
    good = client.final_message(first).decode()
    attrs = dict(item.split("=", 1) for item in good.split(","))
    attrs.update(replace)
    return ",".join(f"{k}={v}" for k, v in attrs.items()).encode()


@pytest.mark.parametrize(
    "case",
    ["wrong_nonce", "short_nonce", "bad_base64_proof", "short_proof", "bad_channel", "no_proof"],
)
def test_scram_malformed_client_final_is_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, case: str
) -> None:
    proc = pooler()
    user = pg.scram_user
    conn = sasl_started(proc, user.name)
    client = w.ScramClient(user.password)
    first = server_first(conn, client)
    nonce = dict(item.split("=", 1) for item in first.decode().split(","))["r"]
    final = {
        # Its last character changed ("B" where it is an "A" already).
        "wrong_nonce": lambda: final_with(first, client, r=nonce[:-1] + "AB"[nonce[-1] == "A"]),
        "short_nonce": lambda: final_with(first, client, r=client.nonce),
        "bad_base64_proof": lambda: final_with(first, client, p="!!!notbase64!!!"),
        "short_proof": lambda: final_with(first, client, p=base64.b64encode(b"x" * 31).decode()),
        "bad_channel": lambda: final_with(first, client, c=base64.b64encode(b"y,,").decode()),
        "no_proof": lambda: f"c=biws,r={nonce}".encode(),
    }[case]()
    conn.send_raw(w.sasl_response(final))
    error = refusal(conn)
    assert error.sqlstate in ("08P01", "28P01"), error.message
    no_traceback(proc)


def test_scram_channel_binding_p_without_tls_is_refused(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    conn = sasl_started(proc, pg.scram_user.name)
    client = w.ScramClient(pg.scram_user.password)
    conn.send_raw(
        w.sasl_initial_response(
            "SCRAM-SHA-256", b"p=tls-server-end-point,," + client.client_first_bare.encode()
        )
    )
    assert refusal(conn).sqlstate == "08P01"


def test_scram_y_flag_without_plus_offered_logs_in(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """'y': the client could bind but the server did not offer PLUS. Not offering PLUS,
    the pooler must accept it (and the c= attribute must then be base64('y,,'))."""
    proc = pooler()
    user = pg.scram_user
    conn = sasl_started(proc, user.name)
    client = w.ScramClient(user.password)
    first = server_first(conn, client, gs2=b"y,,")
    # The helper computes its proof with c=biws; rebuild it for y,,.
    import hashlib
    import hmac as hmac_mod

    attrs = dict(item.split("=", 1) for item in first.decode().split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", user.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac_mod.new(salted, b"Client Key", "sha256").digest()
    stored = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(b'y,,').decode()},r={attrs['r']}"
    auth_message = f"{client.client_first_bare},{first.decode()},{without_proof}".encode()
    signature = hmac_mod.new(stored, auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    conn.send_raw(w.sasl_response(f"{without_proof},p={base64.b64encode(proof).decode()}".encode()))
    received = conn.read_until_ready()
    assert w.first_error(received) is None
    conn.close()


@pytest.mark.parametrize(
    "case", ["response_first", "query", "terminate", "unknown_mechanism", "empty_data"]
)
def test_scram_messages_out_of_order(pg: ExamplePostgres, pooler: PoolerFactory, case: str) -> None:
    proc = pooler()
    conn = sasl_started(proc, pg.scram_user.name)
    data = {
        "response_first": w.sasl_response(b"c=biws,r=abc,p=" + base64.b64encode(b"x" * 32)),
        "query": w.query("select 1"),
        "terminate": w.terminate(),
        "unknown_mechanism": w.sasl_initial_response("DIGEST-MD5", b"n,,n=,r=abcdef"),
        "empty_data": w.message(b"p", w.cstr("SCRAM-SHA-256") + struct.pack("!i", -1)),
    }[case]
    conn.send_raw(data)
    if case == "terminate":
        received = conn.wait_closed(timeout=5)
        assert not [m for m in received if m[0] == b"R"]
    else:
        assert refusal(conn).sqlstate == "08P01"
    no_traceback(proc)
    serve_a_client(proc, pg)


def test_scram_second_initial_response_instead_of_final(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    conn = sasl_started(proc, pg.scram_user.name)
    client = w.ScramClient(pg.scram_user.password)
    server_first(conn, client)
    conn.send_raw(w.sasl_initial_response("SCRAM-SHA-256", client.first_message()))
    assert refusal(conn).sqlstate == "08P01"
    no_traceback(proc)


@pytest.mark.parametrize("kind", ["scram_initial", "scram_final", "md5"])
def test_an_oversized_auth_message_is_refused_at_once(
    pg: ExamplePostgres, pooler: PoolerFactory, kind: str
) -> None:
    """PostgreSQL reads a password/SASL message of at most PG_MAX_AUTH_TOKEN_LENGTH
    (65535) bytes and answers a longer length word at once with FATAL 08P01 "invalid
    message length". A pre-authentication client must not make the pooler wait for,
    and buffer, up to 256 MB."""
    proc = pooler()
    user = pg.scram_user if kind.startswith("scram") else pg.md5_user
    conn = sasl_started(proc, user.name) if kind.startswith("scram") else None
    if conn is None:
        conn = w.PgWire(proc.host, proc.port)
        conn.send_raw(w.startup_message({"user": user.name, "database": "example_db"}))
        assert conn.read_message()[0] == b"R"
    if kind == "scram_final":
        server_first(conn, w.ScramClient(user.password))
    conn.send_raw(b"p" + struct.pack("!I", 200_000_000) + b"x" * 70_000)
    started = time.monotonic()
    error = refusal(conn)
    assert time.monotonic() - started < 3
    # PostgreSQL: 28P01 for a SASL message (auth fails), 08P01 for a password packet.
    assert error.sqlstate in ("08P01", "28P01")


def test_a_pre_auth_client_cannot_make_the_pooler_buffer_megabytes(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """An unauthenticated client announces a 200 MB SASLInitialResponse and sends 48 MB
    of it: refused at the length word, as PostgreSQL does, not held in memory."""
    proc = pooler()
    before = proc.rss_bytes()
    conn = sasl_started(proc, pg.scram_user.name)
    chunk = b"x" * (1 << 20)
    try:
        conn.send_raw(b"p" + struct.pack("!I", 200_000_000))
        for _ in range(48):
            conn.sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused early: what should happen
    time.sleep(0.5)
    grown = proc.rss_bytes() - before
    conn.close_socket()
    assert grown < 16 << 20, f"pooler RSS grew by {grown >> 20} MiB for one unauthenticated client"


# ---- md5 -----------------------------------------------------------------------------


def md5_challenged(proc: PoolerProcess, user: str) -> tuple[w.PgWire, bytes]:
    conn = w.PgWire(proc.host, proc.port)
    conn.send_raw(w.startup_message({"user": user, "database": "example_db"}))
    kind, payload = conn.read_message()
    assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_MD5)
    return conn, payload[4:8]


def test_md5_answer_without_its_nul_is_refused_as_postgresql_does(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """PostgreSQL checks strlen(password) + 1 == message length ("invalid password
    packet size", 08P01). Informational: the pooler accepts the unterminated answer."""
    proc = pooler()
    user = pg.md5_user
    conn, salt = md5_challenged(proc, user.name)
    conn.send(b"p", w.md5_response(user.password, user.name, salt).encode())
    try:
        received = conn.wait_closed(timeout=2)
    except TimeoutError:  # logged in and left open
        received = conn.received
    error = w.first_error(received)
    conn.close_socket()
    assert error is not None and error.sqlstate == "08P01", w.msg_types(received)


# ---- pg_hba ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hba", "refusal"),
    [
        ("host all all 10.0.0.0/8 trust\n", "no pg_hba.conf entry"),
        ("host all all 127.0.0.1/32 reject\n", "pg_hba.conf rejects connection"),
    ],
    ids=["no-entry", "reject"],
)
def test_hba_refusals_use_postgresql_words(
    pg: ExamplePostgres, pooler: PoolerFactory, hba: str, refusal: str
) -> None:
    user = pg.scram_user
    proc = pooler(general={"pg_hba": hba})
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    assert info.value.sqlstate == "28000"
    assert info.value.message == (
        f'{refusal} for host "127.0.0.1", user "{user.name}", database "example_db", no encryption'
    )


def test_hba_masks_sameuser_and_first_match(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    md5, scram, trust = pg.md5_user, pg.scram_user, pg.trust_user
    hba = (
        # Not this host: skipped.
        "host all all 127.0.0.2/32 reject\n"
        # Netmask form: matches 127.x; first match for the trust user.
        f"host all {trust.name} 127.0.0.0 255.0.0.0 trust\n"
        # sameuser: the database is named like the user only -> skipped for example_db.
        f"host sameuser {md5.name} 127.0.0.1/32 reject\n"
        # Named database and user, before a broader reject.
        f"host example_db {md5.name} 127.0.0.1/32 md5\n"
        f"host example_db,other {scram.name} 127.0.0.1/8 scram-sha-256\n"
        "host all all 0.0.0.0/0 reject\n"
    )
    proc = pooler(general={"pg_hba": hba})
    for user in (md5, scram):
        conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
        conn.close()
    conn = w.PgWire.connect(proc.host, proc.port, trust.name, "example_db", None)
    conn.close()
    with pytest.raises(w.ServerError) as info:  # sameuser matches database == user
        w.PgWire.connect(proc.host, proc.port, md5.name, md5.name, md5.password)
    assert info.value.sqlstate == "28000"
    with pytest.raises(w.ServerError) as info:  # the catch-all reject
        w.PgWire.connect(proc.host, proc.port, "nobody", "example_db", "x")
    assert info.value.sqlstate == "28000"


# ---- half-open logins ------------------------------------------------------------------


def test_many_half_open_logins_do_not_block_a_normal_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(general={"client_login_timeout": "3s"})
    silent = [raw(proc.host, proc.port) for _ in range(40)]
    # Half of them send half a startup packet, a few an SSLRequest and then nothing.
    for i, sock in enumerate(silent):
        if i % 2:
            sock.sendall(struct.pack("!i", 40) + b"\x00\x03")
        elif i % 5 == 0:
            sock.sendall(w.ssl_request())
    try:
        started = time.monotonic()
        lists = {r["list"]: r["items"] for r in admin_rows(proc, "LISTS")}
        assert int(lists["login_clients"] or 0) >= 40
        serve_a_client(proc, pg)
        assert time.monotonic() - started < 2.5  # served, not behind the silent ones
        time.sleep(max(0.0, started + 3.5 - time.monotonic()))
        for sock in silent:  # all cut by the timeout
            assert read_reply(sock, 0.5)[-1:] in (b"", b"N")
            sock.settimeout(0.5)
            assert sock.recv(1) == b""
        lists = {r["list"]: r["items"] for r in admin_rows(proc, "LISTS")}
        assert lists["login_clients"] == "0"
        clients = [r for r in admin_rows(proc, "CLIENTS") if r["user"] != "admin"]
        assert clients == []
        serve_a_client(proc, pg)
    finally:
        for sock in silent:
            sock.close()


# ---- other -------------------------------------------------------------------------------


def test_a_jwt_with_a_deeply_nested_header_is_a_password_failure(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """The token header is read before its signature is checked, so any client
    controls it: JSON nested 5000 deep (json.loads raises RecursionError) is a wrong
    password (28P01), not an internal error."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "jwt.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    user = pg.trust_user.name
    proc = pooler(
        general={"pg_hba": "host all all 127.0.0.1/32 md5\n"},
        pools={
            "example_db": {
                "users": Replace([{"username": user, "password": f"jwt-pkey-fpath:{public}"}])
            }
        },
    )
    header = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()
    token = f"{header}.e30.AAAA"
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user, "example_db", token)
    assert info.value.sqlstate == "28P01", info.value.message
    no_traceback(proc)


def first_auth_request(proc: PoolerProcess, user: str, database: str = "example_db") -> int:
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.startup_message({"user": user, "database": database}))
        kind, payload = conn.read_message()
        assert kind == b"R", payload
        return int.from_bytes(payload[:4], "big")
    finally:
        conn.close_socket()


def test_an_unknown_user_is_not_told_apart_by_the_auth_method(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Under a scram-sha-256 pg_hba line a real (SCRAM) user is asked for SASL; a user
    that does not exist must be asked the same (PostgreSQL runs a mock SCRAM exchange),
    or the first reply tells which user names exist without any password."""
    proc = pooler(general={"pg_hba": "host all all 127.0.0.1/32 scram-sha-256\n"})
    assert first_auth_request(proc, pg.scram_user.name) == w.AUTH_SASL
    assert first_auth_request(proc, "no_such_user") == w.AUTH_SASL


@pytest.mark.parametrize(
    "pg_hba", [None, "host all all 127.0.0.1/32 md5\n"], ids=["no-pg_hba", "md5-line"]
)
def test_an_unknown_user_gets_postgresqls_mock_scram_under_any_password_line(
    pg: ExamplePostgres, pooler: PoolerFactory, pg_hba: str | None
) -> None:
    """Without pg_hba or under an md5 line PostgreSQL still fakes SCRAM for a role that
    does not exist (its default password_encryption): an MD5 challenge there would
    set unknown names apart from the SCRAM users, before any password is sent."""
    proc = pooler(general={} if pg_hba is None else {"pg_hba": pg_hba})
    assert first_auth_request(proc, pg.scram_user.name) == w.AUTH_SASL
    assert first_auth_request(proc, "no_such_user") == w.AUTH_SASL
    assert mock_exchange_salt(proc, "no_such_user") == mock_exchange_salt(proc, "no_such_user")


def test_queries_sent_ahead_of_the_login_are_all_answered(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A client that pipelines its startup packet and 2000 queries (~300 KB) in one go
    (trust, so no round trip) gets every answer: whatever the pooler does to bound what
    it buffers during the login, nothing sent ahead is lost."""
    proc = pooler()
    conn = w.PgWire(proc.host, proc.port)
    try:
        queries = b"".join(w.query(f"select {i}, '{'x' * 100}'") for i in range(2000))
        conn.send_raw(
            w.startup_message({"user": pg.trust_user.name, "database": "example_db"}) + queries
        )
        conn.read_until_ready()  # the greeting
        for i in range(2000):
            got = conn.read_until_ready()
            assert w.rows(got)[0][0] == str(i)
    finally:
        conn.close()


def mock_exchange_salt(proc: PoolerProcess, user: str) -> bytes:
    """The salt a SCRAM exchange for `user` offers, run to its end: 28P01."""
    conn = sasl_started(proc, user)
    client = w.ScramClient("whatever")
    first = server_first(conn, client)
    salt = dict(item.split("=", 1) for item in first.decode().split(","))["s"]
    conn.send_raw(w.sasl_response(client.final_message(first)))
    error = refusal(conn)
    assert error.sqlstate == "28P01"
    assert error.message == f'password authentication failed for user "{user}"'
    return base64.b64decode(salt)


def test_an_unknown_user_fails_a_whole_scram_exchange_like_a_wrong_password(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Under a scram-sha-256 line: the unknown user runs the exchange to its end and
    gets the wrong-password error; its salt is the same at every attempt, as a real
    user's is."""
    proc = pooler(general={"pg_hba": "host all all 127.0.0.1/32 scram-sha-256\n"})
    salts = [mock_exchange_salt(proc, "no_such_user") for _ in range(2)]
    assert salts[0] == salts[1]
    no_traceback(proc)
    w.PgWire.connect(
        proc.host, proc.port, pg.scram_user.name, "example_db", pg.scram_user.password
    ).close()


def test_mock_salts_come_from_a_random_secret_every_process_shares(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """An unknown user's salt is no function of the config (anyone knowing or guessing
    admin_password could tell mock exchanges apart, or test guesses of the password
    offline): two poolers with the same config offer different salts. Within one
    pooler every worker offers the same one, and PG_DOORMAN_MOCK_AUTH_SECRET, when
    set, is the secret."""
    scram_hba = {"pg_hba": "host all all 127.0.0.1/32 scram-sha-256\n"}
    first, second = pooler(general=scram_hba), pooler(general=scram_hba)
    assert mock_exchange_salt(first, "nobody") != mock_exchange_salt(second, "nobody")

    secret = "kept across restarts"
    workers = pooler(general={**scram_hba, "workers": 2}, env={MOCK_AUTH_SECRET_ENV: secret})
    expected = hmac.digest(secret.encode(), b"pg_doorman mock salt\0nobody", "sha256")[:16]
    # Held open at once, so that the supervisor hands them to both workers.
    exchanges = [sasl_started(workers, "nobody") for _ in range(6)]
    salts = set()
    for conn in exchanges:
        first = server_first(conn, w.ScramClient("whatever"))
        salts.add(base64.b64decode(dict(i.split("=", 1) for i in first.decode().split(","))["s"]))
        conn.close_socket()
    assert salts == {expected}
    assert mock_exchange_salt(workers, "somebody") != expected
    assert mock_exchange_salt(workers, "nobody") == expected
