"""Command line: `pg_doorman [CONFIG] [-l LEVEL] [-F FORMAT] [-n] [-t] [-d]`,
`pg_doorman generate` and `pg_doorman demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pg_doorman import __version__
from pg_doorman.app import daemon, event_loop
from pg_doorman.app.cluster import WorkerInfo
from pg_doorman.app.logsetup import LEVELS, setup_logging, skip_unused_record_fields
from pg_doorman.app.upgrade import (
    Upgrade,
    announce_ready,
    started_by_upgrade,
    take_migration_channel,
)
from pg_doorman.auth.mock_auth import mock_auth_secret
from pg_doorman.config import Config, ConfigError, load_config

logger = logging.getLogger("pg_doorman")

EXIT_CONFIG = 2
EXIT_USAGE = 2

LOG_FORMATS = ("text", "structured", "debug")
# PgDoorman's third format; here the text format, which already names each line's logger.
_LOG_FORMAT_ALIASES = {"debug": "text"}
# PgDoorman's -l also takes tracing's level numbers.
_LEVEL_NUMBERS = {"1": "error", "2": "warn", "3": "info", "4": "debug", "5": "trace"}


def _log_level(text: str) -> str:
    """A -l value as PgDoorman spells it (`INFO`, `Warn`, `4`) in this pooler's names."""
    name = text.strip().lower()
    return _LEVEL_NUMBERS.get(name, name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg_doorman",
        description="PostgreSQL connection pooler. `pg_doorman generate` writes a config "
        "for a PostgreSQL server; `pg_doorman demo` starts a local PostgreSQL with the "
        "pooler in front.",
    )
    parser.add_argument(
        "config", nargs="?", default="pg_doorman.toml", help="config file (.toml or .yaml)"
    )
    parser.add_argument(
        "-l",
        "--log-level",
        type=_log_level,
        choices=sorted(LEVELS),
        help="log level, any case (default: $LOG_LEVEL, else general.log_level, else info)",
    )
    parser.add_argument(
        "-F",
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        help="log format; structured = one JSON object per line; debug = text "
        "(default: $LOG_FORMAT, else text)",
    )
    parser.add_argument(
        "-n",
        "--no-color",
        action="store_true",
        help="accepted for PgDoorman's command lines (and NO_COLOR): the log has no colours",
    )
    # PgDoorman's own binary upgrade passes its listening socket so; refused in main().
    parser.add_argument("--inherit-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "-t", "--test-config", action="store_true", help="validate the config and exit"
    )
    parser.add_argument(
        "-d",
        "--daemon",
        action="store_true",
        help="run in the background, the PID in general.daemon_pid_file; the command "
        "exits once the pooler serves (0), or with its error",
    )
    parser.add_argument("-V", "--version", action="version", version=f"pg_doorman {__version__}")
    # Set by the supervisor when it starts a worker process (general.workers > 1).
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rundir", help=argparse.SUPPRESS)
    # The configuration the other workers run (app.cluster.publish_running_config).
    parser.add_argument("--config-snapshot", help=argparse.SUPPRESS)
    parser.add_argument("--dispatch-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--previous-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--moved-clients", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    return parser


def _parse_args(args_list: list[str]) -> argparse.Namespace:
    """The command line, with LOG_LEVEL and LOG_FORMAT (PgDoorman's variables) as the
    defaults of -l and -F; -F debug becomes text."""
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.log_level is None and os.environ.get("LOG_LEVEL"):
        args.log_level = _log_level(os.environ["LOG_LEVEL"])
        if args.log_level not in LEVELS:
            parser.error(f"LOG_LEVEL: unknown log level {os.environ['LOG_LEVEL']!r}")
    if args.log_format is None:
        args.log_format = os.environ.get("LOG_FORMAT", "text").strip().lower() or "text"
        if args.log_format not in LOG_FORMATS:
            parser.error(f"LOG_FORMAT: unknown log format {os.environ['LOG_FORMAT']!r}")
    args.log_format = _LOG_FORMAT_ALIASES.get(args.log_format, args.log_format)
    return args


def _subcommand(name: str, rest: list[str]) -> int | None:
    """Run a subcommand; None if `name` is none."""
    if name == "demo":
        from pg_doorman.app.demo import demo_main

        return demo_main(rest)
    if name == "generate":
        from pg_doorman.app.generate import generate_main

        return generate_main(rest)
    if name == "generate-docs":
        print(
            "pg_doorman: generate-docs (PgDoorman's reference pages) is not supported: "
            "the configuration is described in docs/configuration.md",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list:
        code = _subcommand(args_list[0], args_list[1:])
        if code is not None:
            return code
    # Until the event loop handles it: SIGUSR2's default action would kill the process.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    args = _parse_args(args_list)
    if args.inherit_fd is not None:
        print(
            "pg_doorman: --inherit-fd is PgDoorman's binary upgrade hand-off, which this "
            "pooler does not take part in: stop PgDoorman, then start pg_doorman; later "
            "upgrades of pg_doorman keep the socket themselves (docs/admin.md, "
            '"Binary upgrade")',
            file=sys.stderr,
        )
        return EXIT_USAGE
    worker = _worker_info(args)
    if worker is None:
        from pg_doorman.app.upgrade import take_inherited

        take_inherited()
    # Made before any worker or upgraded process is started, which inherit it.
    mock_auth_secret()
    worker_index = worker.index if worker is not None else None
    skip_unused_record_fields()
    setup_logging(args.log_level or "info", args.log_format, worker_index)
    try:
        if args.config_snapshot is not None:
            from pg_doorman.app.cluster import read_config_snapshot

            config = read_config_snapshot(args.config_snapshot)
        else:
            config = load_checked_config(args.config)
    except ConfigError as exc:
        print(f"pg_doorman: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log_level = args.log_level or config.general.log_level or "info"
    # -t only checks: its messages are for whoever runs it (an upgrade reads them too).
    syslog_ident = None if args.test_config else config.general.syslog_prog_name
    to_syslog = False
    if syslog_ident or (args.log_level is None and config.general.log_level):
        to_syslog = setup_logging(
            log_level, args.log_format, worker_index, syslog_ident=syslog_ident
        )
    if worker is None:  # workers would repeat what the supervisor already said
        for warning in config.warnings:
            logger.warning("config: %s", warning)
    if args.test_config:
        print(f"pg_doorman: configuration {args.config} is valid")
        return 0
    if worker is not None:
        return run_loop(
            lambda: serve(
                config,
                worker=worker,
                dispatch_fd=args.dispatch_fd,
                previous_fd=args.previous_fd,
                moved_clients=args.moved_clients,
                supervisor_pid=args.supervisor_pid,
            )
        )
    if args.daemon:
        try:
            launcher_code = _daemonize(config, to_syslog)
        except daemon.PidFileError as exc:
            print(f"pg_doorman: {exc}", file=sys.stderr)
            daemon.finish(1)
            return 1
        if launcher_code is not None:
            return launcher_code
    code = 1
    try:
        code = _run_pooler(config, log_level, args.log_format, args_list)
    finally:
        daemon.finish(code)
    return code


def _daemonize(config: Config, to_syslog: bool) -> int | None:
    """-d: detach (see app.daemon). In the command that was started: its exit code;
    None in the daemon."""
    pid_file = config.general.daemon_pid_file
    if started_by_upgrade():  # by an upgrade of a daemon: already detached
        daemon.adopt(pid_file)
        return None
    if not to_syslog:
        print(
            "pg_doorman: warning: without general.syslog_prog_name (or its syslog socket) "
            "the daemon's log is discarded once it serves",
            file=sys.stderr,
        )
    return daemon.detach(pid_file)


def _run_pooler(config: Config, log_level: str, log_format: str, argv: list[str]) -> int:
    from pg_doorman.app.supervisor import Supervisor, worker_count

    if worker_count(config) > 1:
        return run_loop(
            lambda: Supervisor(config, log_level, log_format, upgrade_argv=argv).serve()
        )
    return run_loop(lambda: serve(config, upgrade_argv=argv))


async def _exit_with_parent(stop: asyncio.Event, parent: int | None) -> None:
    """A worker whose supervisor is gone (killed) shuts down instead of living on.
    `parent`: the supervisor's pid as it said at the start; the worker's own view of
    its parent comes too late if the supervisor died while the worker was starting."""
    if parent is None:
        parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logger.warning("the supervisor is gone: shutting down")
    stop.set()


def _worker_info(args: argparse.Namespace) -> WorkerInfo | None:
    if args.worker is None:
        return None
    index, _, count = str(args.worker).partition("/")
    return WorkerInfo(index=int(index), count=int(count), rundir=str(args.rundir))


def load_checked_config(path: str) -> Config:
    """Load the config and everything derived from it that can fail (pg_hba rules,
    the TLS certificates and keys, for clients and for servers)."""
    from pg_doorman.auth.hba import HbaError, HbaRules
    from pg_doorman.auth.talos import Talos, TalosKeyError
    from pg_doorman.net.server_tls import server_tls_for
    from pg_doorman.net.tls import TlsSetupError, client_tls_context

    config = load_config(path)
    if config.general.pg_hba is not None:  # empty text too: it has no rules
        try:
            HbaRules.parse(config.general.pg_hba)
        except HbaError as exc:
            raise ConfigError("general.pg_hba", str(exc)) from exc
    try:
        client_tls_context(config.general)
    except TlsSetupError as exc:
        raise ConfigError(f"general.{exc.key}", str(exc)) from exc
    for name, pool in config.pools.items():
        try:
            server_tls_for(config.general, pool, f"pools.{name}")
        except TlsSetupError as exc:
            raise ConfigError(exc.key, str(exc)) from exc
        for index, user in enumerate(pool.users):
            path = f"pools.{name}.users[{index}]"
            _check_token_key(f"{path}.password", user.password)
            _check_token_key(f"{path}.server_password", user.server_password)
        if pool.auth_query is not None:
            _check_token_key(
                f"pools.{name}.auth_query.server_password", pool.auth_query.server_password
            )
    try:
        Talos.load(config.talos)
    except TalosKeyError as exc:
        raise ConfigError(exc.key, str(exc)) from exc
    return config


def _check_token_key(key_path: str, value: str | None) -> None:
    """A `jwt-pkey-fpath:` or `jwt-priv-key-fpath:` value must name a usable RSA key."""
    from pg_doorman.auth.jwt import JwtError, TokenSigner, TokenVerifier
    from pg_doorman.auth.methods import JWT_PRIVATE_KEY_PREFIX as PRIVATE_KEY_PREFIX
    from pg_doorman.auth.methods import JWT_PUBLIC_KEY_PREFIX as PUBLIC_KEY_PREFIX

    try:
        if value is not None and value.startswith(PUBLIC_KEY_PREFIX):
            if key_path.endswith(".server_password"):
                raise JwtError(f"a server_password signs tokens: use {PRIVATE_KEY_PREFIX}<file>")
            TokenVerifier.load(value.removeprefix(PUBLIC_KEY_PREFIX))
        elif value is not None and value.startswith(PRIVATE_KEY_PREFIX):
            if not key_path.endswith(".server_password"):
                raise JwtError(f"a password checks tokens: use {PUBLIC_KEY_PREFIX}<file>")
            TokenSigner.load(value.removeprefix(PRIVATE_KEY_PREFIX))
    except JwtError as exc:
        raise ConfigError(key_path, str(exc)) from exc


def run_loop(main_coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        event_loop.choose()
    except event_loop.EventLoopChoiceError as exc:
        print(f"pg_doorman: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with asyncio.Runner(loop_factory=event_loop.new_event_loop) as runner:
        return runner.run(main_coro())


async def serve(
    config: Config,
    *,
    ready: Callable[[], None] | None = None,
    worker: WorkerInfo | None = None,
    dispatch_fd: int | None = None,
    previous_fd: int | None = None,
    moved_clients: bool = False,
    supervisor_pid: int | None = None,
    upgrade_argv: Sequence[str] | None = None,
) -> int:
    """Run one pooler process until it is stopped. `upgrade_argv`: its command line,
    which SIGUSR2 starts again as its successor (see app.upgrade)."""
    from pg_doorman.app.pooler import Pooler

    loop = asyncio.get_running_loop()
    pooler = Pooler(config, loop, worker=worker)
    dispatch = None
    if dispatch_fd is not None:
        dispatch = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=dispatch_fd)
    if previous_fd is not None:
        # A worker of a process an upgrade started: the old process's channel, for
        # cancel requests meant for its clients (see Pooler.cancel_here).
        pooler.previous_process = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=previous_fd
        )
        pooler.previous_process.setblocking(False)
    pooler.moved_in_cluster = moved_clients
    if previous_fd is not None or (worker is None and started_by_upgrade()):
        # The clients the old process hands over keep their ids: count new ones from
        # elsewhere, so that the two rarely meet.
        pooler.ids.skip_client_ids(random.randrange(1 << (pooler.ids.WORKER_SHIFT - 1)))
    # Handlers first: a signal sent as soon as the port accepts (a reload right after a
    # readiness probe, say) must not find the default action, which kills the process.
    stop = asyncio.Event()
    # Set with stop: running transactions are not waited for (SIGQUIT, or a second
    # SIGINT/SIGTERM, as in PgBouncer).
    immediate = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signum != signal.SIGQUIT and signals == 1:
            logger.info("received %s: shutting down gracefully", name)
        elif not immediate.is_set():
            logger.warning("received %s: shutting down now, transactions are cut", name)
            immediate.set()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        loop.add_signal_handler(signum, on_signal, signum)
    if worker is not None:
        # A terminal's Ctrl-C reaches every process of the group; the supervisor
        # answers it by sending SIGTERM to the workers.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        pooler.track(loop.create_task(_exit_with_parent(stop, supervisor_pid)))

    def on_reload() -> None:
        if stop.is_set():
            logger.info("SIGHUP ignored: the pooler is shutting down")
            return
        if worker is not None:
            # The supervisor reloads every worker with one reading of the file; a
            # worker reading it on its own could see another version of it.
            logger.info(
                "SIGHUP ignored: reload with SIGHUP to the supervisor (pid %s)", supervisor_pid
            )
            return
        try:
            pooler.reload_file()
        except ConfigError as exc:
            logger.error("SIGHUP: reload failed, the old configuration stays: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, on_reload)
    upgrade = Upgrade(upgrade_argv, config.source) if upgrade_argv is not None else None

    def on_upgrade() -> None:
        if upgrade is None:
            logger.warning("SIGUSR2: only the process started from the command line upgrades")
        else:
            pooler.track(loop.create_task(upgrade.run(pooler.listeners, stop)))

    loop.add_signal_handler(signal.SIGUSR2, on_upgrade)
    try:
        await pooler.start(dispatch=dispatch)
    except OSError as exc:
        if exc.strerror and exc.strerror.startswith("cannot listen"):
            logger.error("%s", exc.strerror)
        else:
            logger.error(
                "cannot listen on %s:%d: %s",
                config.general.host,
                config.general.port,
                exc.strerror,
            )
        return 1
    pooler.on_shutdown_request = stop.set
    if worker is None:
        channel = take_migration_channel()
        if channel is not None:
            pooler.immigrate_from(channel)
    if ready is not None:
        ready()
    if worker is None:
        announce_ready()
    await stop.wait()
    channel = None if upgrade is None else upgrade.take_channel()
    if channel is not None:
        pooler.emigrate_to(channel)
    await pooler.shutdown(immediate=immediate)
    if upgrade is None or upgrade.successor is None:
        for socket_file in pooler.socket_files:
            socket_file.remove()
    logger.info("pg_doorman stopped")
    return 1 if immediate.is_set() else 0
