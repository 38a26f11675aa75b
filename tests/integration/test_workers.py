"""Several worker processes (general.workers = 2): one pooler to clients and operators."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.console import show_table as table
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.dispatch import LoadBoard
from pg_doorman.app.embedded_pg import free_port, process_alive

WORKERS = 2
CLIENTS = 24
TRANSACTIONS = 10


def start(pooler: PoolerFactory, pool_size: int = 4, **general: object) -> PoolerProcess:
    users = [{"username": "example_user_md5", "pool_size": pool_size}]
    proc = pooler(general={"workers": WORKERS, **general}, pools={EXAMPLE_DB: {"users": users}})
    proc.wait_for_log(f"all {WORKERS} workers ready", timeout=30)
    return proc


def worker_of(client_id: str | None) -> int:
    assert client_id is not None
    return int(client_id.removeprefix("#c")) >> 24


def run_clients(
    proc: PoolerProcess, pg: ExamplePostgres
) -> list[psycopg.Connection[tuple[object, ...]]]:
    """CLIENTS connections, each running TRANSACTIONS transactions, left open."""
    conns = [
        psycopg.connect(proc.dsn(pg.md5_user.name, "test"), autocommit=True) for _ in range(CLIENTS)
    ]
    errors: list[BaseException] = []

    def work(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        try:
            for i in range(TRANSACTIONS):
                assert conn.execute("select %s::int", (i,), prepare=False).fetchone() == (i,)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return conns


def test_clients_spread_over_workers_and_show_adds_them_up(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pooler)
    conns = run_clients(proc, pg)
    try:
        console = admin(proc)
        clients = [c for c in table(console, "CLIENTS") if c["user"] == pg.md5_user.name]
        assert len(clients) == CLIENTS
        # The supervisor hands each connection to the least-loaded worker: an even split.
        per_worker = [worker_of(c["client_id"]) for c in clients]
        assert [per_worker.count(i) for i in range(WORKERS)] == [CLIENTS // WORKERS] * WORKERS
        stats = next(r for r in table(console, "STATS") if r["user"] == pg.md5_user.name)
        assert stats["total_xact_count"] == str(CLIENTS * TRANSACTIONS)
        pool = next(r for r in table(console, "POOLS") if r["user"] == pg.md5_user.name)
        # pool_size 4 is split 2 + 2: the whole pooler never opens more than 4.
        assert pool["pool_size"] == "4" and pool["cl_idle"] == str(CLIENTS)
        servers = [s for s in table(console, "SERVERS") if s["user"] == pg.md5_user.name]
        assert 2 <= len(servers) <= 4
        latency = next(
            r
            for r in table(console, "LATENCY")
            if r["user"] == pg.md5_user.name and r["kind"] == "transaction"
        )
        assert latency["count"] == str(CLIENTS * TRANSACTIONS)
        console.close()
    finally:
        for conn in conns:
            conn.close()


def test_new_clients_go_to_the_worker_with_fewest(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pooler)
    console = admin(proc)

    def owners() -> dict[int, int]:
        """Open clients per worker (the admin connection included)."""
        counts = dict.fromkeys(range(WORKERS), 0)
        for client in table(console, "CLIENTS"):
            counts[worker_of(client["client_id"])] += 1
        return counts

    conns = [psycopg.connect(proc.dsn(pg.md5_user.name, "test")) for _ in range(8)]
    before = owners()
    assert sorted(before.values()) == [4, 5]
    # Close the clients of the busier worker; it becomes the one with fewest.
    busier = max(before, key=lambda i: before[i])
    clients = [c for c in table(console, "CLIENTS") if c["user"] == pg.md5_user.name]
    ports = {int(c["port"] or 0) for c in clients if worker_of(c["client_id"]) == busier}
    for conn in [c for c in conns if local_port(c) in ports]:
        conn.close()
    deadline = time.monotonic() + 10
    while owners()[busier] != before[busier] - len(ports):
        assert time.monotonic() < deadline, owners()
        time.sleep(0.05)
    after = owners()
    fresh = [psycopg.connect(proc.dsn(pg.md5_user.name, "test")) for _ in range(2)]
    assert owners() == {busier: after[busier] + 2, 1 - busier: after[1 - busier]}
    console.close()
    for conn in conns + fresh:
        conn.close()


def local_port(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        port: int = sock.getsockname()[1]
    return port


def test_cancel_requests_reach_the_owning_worker(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Each CancelRequest arrives on a new connection that the kernel gives to either
    worker; every one must cancel its query."""
    # 4 servers per worker: every sleeper runs at once, whichever worker it landed on.
    proc = start(pooler, pool_size=8)
    sleepers = [
        psycopg.connect(proc.dsn(pg.md5_user.name, "test"), autocommit=True) for _ in range(4)
    ]
    outcomes: list[str] = []

    def sleep(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        try:
            conn.execute("select pg_sleep(20)")
            outcomes.append("finished")
        except psycopg.errors.QueryCanceled:
            outcomes.append("canceled")

    threads = [threading.Thread(target=sleep, args=(c,)) for c in sleepers]
    for thread in threads:
        thread.start()
    # Cancel only once every query runs on a server (a queued one has nothing to cancel).
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as direct:
        deadline = time.monotonic() + 10
        while direct.execute(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(20)'"
            " and state = 'active'"
        ).fetchone() != (4,):
            assert time.monotonic() < deadline, "the sleepers did not all start"
            time.sleep(0.05)
    started = time.monotonic()
    for conn in sleepers:
        conn.cancel()
    for thread in threads:
        thread.join(30)
    assert outcomes == ["canceled"] * 4
    assert time.monotonic() - started < 10
    console = admin(proc)
    connections = table(console, "CONNECTIONS")[0]
    assert connections["cancel"] == "4"
    console.close()
    for conn in sleepers:
        conn.close()


def test_control_commands_act_on_every_worker(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = start(pooler)
    conns = run_clients(proc, pg)
    console = admin(proc)
    try:
        got = console.simple_query("PAUSE example_db")
        assert [w.command_tag(p) for t, p in got if t == b"C"] == ["PAUSE"]
        pool = next(r for r in table(console, "POOLS") if r["user"] == pg.md5_user.name)
        assert pool["paused"] == "1" and pool["sv_idle"] == "0"
        blocked: list[object] = []
        thread = threading.Thread(
            target=lambda: blocked.append(conns[0].execute("select 3").fetchone())
        )
        thread.start()
        time.sleep(0.5)
        assert blocked == []
        console.simple_query("RESUME example_db")
        thread.join(10)
        assert blocked == [(3,)]
        # RELOAD reaches every worker: the global pool_size changes everywhere.
        users = proc.config["pools"][EXAMPLE_DB]["users"]
        next(u for u in users if u["username"] == pg.md5_user.name)["pool_size"] = 6
        proc.write_config()
        assert w.first_error(console.simple_query("RELOAD")) is None
        pool = next(r for r in table(console, "POOLS") if r["user"] == pg.md5_user.name)
        assert pool["pool_size"] == "6"
        console.simple_query("SET log_level = 'info'")
        # KILL disconnects the clients of both workers.
        assert w.first_error(console.simple_query("KILL example_db")) is None
        for conn in conns[:3]:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")
        console.simple_query("RESUME")
        with psycopg.connect(proc.dsn(pg.md5_user.name, "test"), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        console.close()
        for conn in conns:
            conn.close()


def test_metrics_cover_every_worker(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    port = free_port()
    proc = pooler(
        general={"workers": WORKERS}, web={"enabled": True, "host": "127.0.0.1", "port": port}
    )
    proc.wait_for_log(f"all {WORKERS} workers ready", timeout=30)
    conns = run_clients(proc, pg)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        mine = (("database", EXAMPLE_DB), ("user", pg.md5_user.name))
        assert samples[("pg_doorman_pools_transactions_total", mine)] == CLIENTS * TRANSACTIONS
        assert samples[("pg_doorman_workers", ())] == WORKERS
        # Handed out by load: each worker holds half of the clients.
        for index in range(WORKERS):
            key = ("pg_doorman_worker_connection_count", (("worker", str(index)),))
            assert samples[key] == CLIENTS // WORKERS
        assert samples[("pg_doorman_pool_size", mine)] == 4
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
    finally:
        for conn in conns:
            conn.close()


def test_a_dead_worker_is_replaced_and_the_other_keeps_serving(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pooler)
    conns = run_clients(proc, pg)
    console = admin(proc)
    victims = {worker_of(c["client_id"]) for c in table(console, "CLIENTS") if c["user"]}
    assert victims == {0, 1}
    pids = _worker_pids(proc)
    os.kill(pids[1], signal.SIGKILL)
    proc.wait_for_log("worker 1 exited", timeout=10)
    survivors = 0
    for conn in conns:
        try:
            conn.execute("select 1")
            survivors += 1
        except psycopg.OperationalError:
            pass  # a client of the killed worker
    # The clients were split evenly: half of them lived on the killed worker.
    assert survivors == CLIENTS - CLIENTS // WORKERS
    deadline = time.monotonic() + 15
    while True:
        try:
            fresh = [
                psycopg.connect(proc.dsn(pg.md5_user.name, "test"), autocommit=True)
                for _ in range(8)
            ]
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    for conn in fresh:
        assert conn.execute("select 2").fetchone() == (2,)
        conn.close()
    console.close()
    for conn in conns:
        conn.close()


def test_sigterm_stops_every_worker(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = start(pooler)
    pids = _worker_pids(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait_exit(20) == 0
    for pid in pids:
        deadline = time.monotonic() + 5
        while process_alive(pid):
            assert time.monotonic() < deadline, f"worker {pid} outlived the supervisor"
            time.sleep(0.05)


def _worker_pids(proc: PoolerProcess) -> list[int]:
    assert proc.pid is not None
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    with open(children) as f:
        pids = [int(p) for p in f.read().split()]
    assert len(pids) == WORKERS
    return sorted(pids, key=_worker_index)


def _worker_index(pid: int) -> int:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().split(b"\x00")
    return int(args[args.index(b"--worker") + 1].split(b"/")[0])


def test_shutdown_command_stops_the_supervisor(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = start(pooler)
    pids = _worker_pids(proc)
    console = admin(proc)
    got = console.simple_query("SHUTDOWN")
    assert w.rows(got) == [("t",)]
    console.close_socket()
    assert proc.wait_exit(20) == 0
    assert not any(process_alive(pid) for pid in pids)


def test_unix_socket_and_sighup_reach_every_worker(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    import tempfile

    user = pg.md5_user
    with tempfile.TemporaryDirectory(prefix="pgd-sock-") as sockdir:
        proc = start(
            pooler,
            unix_socket_dir=sockdir,
            pg_hba="local all all md5\nhost all all 127.0.0.1/32 md5\n",
        )
        dsn = f"host={sockdir} port={proc.port} dbname={EXAMPLE_DB} user={user.name}"
        conns = [psycopg.connect(dsn, password=user.password, autocommit=True) for _ in range(8)]
        for conn in conns:
            assert conn.execute("select 1").fetchone() == (1,)
        console = admin(proc)
        clients = [c for c in table(console, "CLIENTS") if c["addr"] == "unix"]
        assert len(clients) == 8
        # Unix connections are handed out by the supervisor too.
        assert {worker_of(c["client_id"]) for c in clients} == set(range(WORKERS))
        # SIGHUP to the supervisor: every worker applies the file.
        users = proc.config["pools"][EXAMPLE_DB]["users"]
        next(u for u in users if u["username"] == user.name)["pool_size"] = 10
        proc.write_config()
        proc.reload()
        deadline = time.monotonic() + 10
        while True:
            pool = next(r for r in table(console, "POOLS") if r["user"] == user.name)
            if pool["pool_size"] == "10":
                break
            assert time.monotonic() < deadline, pool
            time.sleep(0.1)
        assert proc.log_text().count("configuration reloaded") == WORKERS
        console.close()
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("how", ["sighup", "reload-command", "sighup-late"])
def test_every_worker_applies_the_same_reading_of_the_file(
    pg: ExamplePostgres, pooler: PoolerFactory, how: str
) -> None:
    """A reload reads the file once and every worker applies that reading. One worker
    is stopped while the reload runs and the file changes again before it runs on: it
    applies what the other one did, not the newer file (the next reload brings that).
    "late": it stays stopped past the supervisor's wait for its answer."""
    from pg_doorman.app.cluster import CALL_TIMEOUT

    proc = start(pooler)
    console = admin(proc)
    (own,) = [c for c in table(console, "CLIENTS") if c["user"] == "admin"]
    stopped = _worker_pids(proc)[1 - worker_of(own["client_id"])]
    # Another name for the example database: "alpha" in one version, "beta" in the next.
    pool = {**proc.config["pools"][EXAMPLE_DB], "server_database": EXAMPLE_DB}
    first = {**proc.config, "pools": {**proc.config["pools"], "alpha": pool}}
    second = {**proc.config, "pools": {**proc.config["pools"], "beta": pool}}

    def reloads() -> int:
        return proc.log_text().count("configuration reloaded")

    done = reloads()
    proc.write_config(first)
    os.kill(stopped, signal.SIGSTOP)
    try:
        if how == "reload-command":
            console.send_raw(w.query("RELOAD"))
        else:
            proc.reload()
        deadline = time.monotonic() + 10
        while reloads() == done:
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        proc.write_config(second)
        if how == "sighup-late":
            proc.wait_for_log("did not answer the reload", timeout=CALL_TIMEOUT + 5)
    finally:
        os.kill(stopped, signal.SIGCONT)
    deadline = time.monotonic() + CALL_TIMEOUT
    while reloads() < done + WORKERS:
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    if how == "reload-command":
        assert w.first_error(console.read_until_ready(10)) is None
    if how == "sighup-late":
        # Its answer finds the supervisor gone: no complaint about the request.
        proc.wait_for_log("its sender stopped waiting for the answer")
        assert "bad control request" not in proc.log_text(), proc.log_tail()
    names = {r["name"] for r in table(console, "DATABASES")}
    assert "alpha" in names and "beta" not in names, names
    # Both workers serve the new pool (the supervisor spreads these over them).
    conns = [
        psycopg.connect(proc.dsn(pg.md5_user.name, "test", database="alpha"), autocommit=True)
        for _ in range(4)
    ]
    for conn in conns:
        assert conn.execute("select current_database()").fetchone() == (EXAMPLE_DB,)
    owners = {
        worker_of(c["client_id"]) for c in table(console, "CLIENTS") if c["database"] == "alpha"
    }
    assert owners == set(range(WORKERS))
    for conn in conns:
        conn.close()
    # A worker sent SIGHUP on its own leaves the reload to the supervisor.
    os.kill(stopped, signal.SIGHUP)
    proc.wait_for_log("SIGHUP ignored")
    proc.reload()
    deadline = time.monotonic() + 10
    while reloads() < done + 2 * WORKERS:
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    names = {r["name"] for r in table(console, "DATABASES")}
    assert "beta" in names and "alpha" not in names, names
    console.close()


def test_a_port_in_use_stops_the_supervisor_with_a_clear_error(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(general={"workers": WORKERS}, start=False)
    with socket.create_server((proc.host, proc.port)):
        proc.spawn()
        assert proc.wait_exit(20) == 1
    assert f"cannot listen on {proc.host}:{proc.port}" in proc.log_text()
    assert "[w0]" not in proc.log_text()  # no worker was started


def test_a_stopped_worker_is_passed_over(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """A worker that stops (SIGSTOP here; a blocked event loop alike) stops taking the
    connections sent to it. Its clients stay connected, so by load alone it would get
    every other new client; past the lag limit the supervisor sends it no more, and new
    clients keep logging in through the other worker. When it runs again, the clients
    queued for it are served too."""
    from pg_doorman.app.dispatch import LAG_LIMIT

    proc = start(pooler)
    stopped = _worker_pids(proc)[1]
    attempts = 2 * (LAG_LIMIT + 1) + 20
    opened: list[psycopg.Connection[tuple[object, ...]]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def log_in() -> None:
        try:
            conn = psycopg.connect(
                proc.dsn(pg.md5_user.name, "test"), autocommit=True, connect_timeout=60
            )
            conn.execute("select 1")
        except psycopg.Error as exc:
            errors.append(exc)
            return
        with lock:
            opened.append(conn)

    os.kill(stopped, signal.SIGSTOP)
    threads = [threading.Thread(target=log_in) for _ in range(attempts)]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.01)  # one at a time, as the supervisor sees them
        # At most LAG_LIMIT + 1 wait for the stopped worker; the rest log in.
        served = attempts - (LAG_LIMIT + 1)
        deadline = time.monotonic() + 30
        while len(opened) < served:
            assert not errors, errors
            assert time.monotonic() < deadline, f"{len(opened)} of {attempts} logged in"
            time.sleep(0.05)
        assert len(opened) < attempts  # the stopped worker did get its share first
    finally:
        os.kill(stopped, signal.SIGCONT)
    for thread in threads:
        thread.join(60)
    try:
        assert not errors, errors
        assert len(opened) == attempts
    finally:
        for conn in opened:
            conn.close()


def test_a_worker_whose_supervisor_died_while_it_started_stops(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """The supervisor gives each worker its pid: a worker that only gets going after
    the supervisor was killed (its parent is then already init) still sees it gone."""
    config = pooler(start=False).config_path
    rundir = tmp_path / "run"
    rundir.mkdir()
    LoadBoard(str(rundir / "load"), 1, create=True).close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has any more
    log = tmp_path / "worker.log"
    try:
        with open(log, "wb") as out:
            argv = [sys.executable, "-m", "pg_doorman", str(config), "--worker", "0/1"]
            argv += ["--rundir", str(rundir), "--dispatch-fd", str(theirs.fileno())]
            argv += ["--supervisor-pid", str(gone.pid)]
            worker = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            assert worker.wait(30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
        assert "the supervisor is gone: shutting down" in log.read_text()
    finally:
        ours.close()
        theirs.close()


def test_a_restarted_worker_runs_the_configuration_the_others_run(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """docs/workers.md: every worker applies the same reading of the file. A file
    edited on disk but not reloaded (here: made invalid) must not stop a crashed
    worker from coming back with the configuration the pooler runs."""
    proc = pooler(general={"workers": WORKERS})
    proc.wait_for_log("all 2 workers ready", timeout=30)
    pids = _worker_pids(proc)
    proc.config_path.write_text(proc.config_path.read_text() + "\n[general.oops\n")
    os.kill(pids[1], signal.SIGKILL)
    proc.wait_for_log("worker 1 exited", timeout=10)
    time.sleep(5.0)  # a restart takes 1 s, plus the worker's start
    log = proc.log_text()
    assert log.count("worker 1 exited") == 1, "worker 1 never came back:\n" + proc.log_tail(20)
    current = _worker_pids(proc)
    assert pids[1] not in current
    user = pg.md5_user
    for _ in range(4):  # the two workers take turns
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_a_reloaded_shutdown_timeout_is_what_the_supervisor_waits(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """shutdown_timeout is reloadable (docs/configuration.md). After a reload that
    raises it, SIGTERM lets a running transaction finish within the new timeout; the
    supervisor must not kill its workers at the old timeout + 5 s."""
    proc = pooler(general={"workers": WORKERS, "shutdown_timeout": 1000})
    proc.wait_for_log("all 2 workers ready", timeout=30)
    config = proc.config
    config["general"]["shutdown_timeout"] = 30_000
    proc.write_config(config)
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proc.log_text().count("configuration reloaded") < 2:
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    user = pg.md5_user
    busy = psycopg.connect(proc.dsn(user.name, user.password))
    try:
        busy.execute("select 1")  # in a transaction
        proc.send_signal(signal.SIGTERM)
        time.sleep(8.0)  # beyond the old 1 s + 5 s
        assert busy.execute("select 2").fetchone() == (2,), "the transaction was cut"
        busy.commit()
        assert proc.wait_exit(30) == 0
        assert "did not stop in time" not in proc.log_text()
    finally:
        busy.close()
