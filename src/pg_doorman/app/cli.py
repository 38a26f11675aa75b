"""Command line: `pg_doorman [CONFIG] [-l LEVEL] [-F FORMAT] [-t]` and `pg_doorman demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pg_doorman import __version__
from pg_doorman.app.logsetup import LEVELS, setup_logging
from pg_doorman.config import Config, ConfigError, load_config

logger = logging.getLogger("pg_doorman")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg_doorman",
        description="PostgreSQL connection pooler. `pg_doorman demo` starts a local "
        "PostgreSQL with the pooler in front.",
    )
    parser.add_argument(
        "config", nargs="?", default="pg_doorman.toml", help="config file (.toml or .yaml)"
    )
    parser.add_argument(
        "-l", "--log-level", choices=sorted(LEVELS), help="log level (default: info)"
    )
    parser.add_argument(
        "-F",
        "--log-format",
        choices=("text", "structured"),
        default="text",
        help="log format; structured = one JSON object per line",
    )
    parser.add_argument(
        "-t", "--test-config", action="store_true", help="validate the config and exit"
    )
    parser.add_argument("-V", "--version", action="version", version=f"pg_doorman {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "demo":
        from pg_doorman.app.demo import demo_main

        return demo_main(args_list[1:])
    args = _parser().parse_args(args_list)
    setup_logging(args.log_level or "info", args.log_format)
    try:
        config = load_checked_config(args.config)
    except ConfigError as exc:
        print(f"pg_doorman: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.log_level is None and config.general.log_level:
        setup_logging(config.general.log_level, args.log_format)
    for warning in config.warnings:
        logger.warning("config: %s", warning)
    if args.test_config:
        print(f"pg_doorman: configuration {args.config} is valid")
        return 0
    return run(config)


def load_checked_config(path: str) -> Config:
    """Load the config and everything derived from it that can fail (pg_hba rules)."""
    from pg_doorman.auth.hba import HbaError, HbaRules

    config = load_config(path)
    if config.general.pg_hba:
        try:
            HbaRules.parse(config.general.pg_hba)
        except HbaError as exc:
            raise ConfigError("general.pg_hba", str(exc)) from exc
    return config


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, the standard loop otherwise; the same code runs on both."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_loop(main_coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main_coro())


def run(config: Config) -> int:
    return run_loop(lambda: serve(config))


async def serve(config: Config, *, ready: Callable[[], None] | None = None) -> int:
    from pg_doorman.app.pooler import Pooler

    loop = asyncio.get_running_loop()
    pooler = Pooler(config, loop)
    try:
        await pooler.start()
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
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("received %s: shutting down gracefully", signal.Signals(signum).name)
            stop.set()
        else:
            logger.warning("received %s again: exiting now", signal.Signals(signum).name)
            raise SystemExit(1)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    def on_reload() -> None:
        try:
            pooler.reload_file()
        except ConfigError as exc:
            logger.error("SIGHUP: reload failed, the old configuration stays: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, on_reload)
    pooler.on_shutdown_request = stop.set
    if ready is not None:
        ready()
    await stop.wait()
    await pooler.shutdown()
    logger.info("pg_doorman stopped")
    return 0
