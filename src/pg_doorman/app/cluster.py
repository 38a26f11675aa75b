"""Worker processes talking to each other: one JSON request per line over Unix sockets.

With `general.workers` > 1 every worker listens on `<rundir>/w<index>.sock`. The admin
console of any worker asks its siblings for their snapshots (SHOW, /metrics) and sends
them control commands (PAUSE, RELOAD, ...); a CancelRequest that reached the wrong
worker is passed to the one that owns the client.

A reload reads the config file once, in the process that was asked (the supervisor on
SIGHUP, the worker whose console ran RELOAD), and every worker applies that one reading
from a snapshot in the private run directory: a file rewritten while the workers read it
one after another would otherwise reach them in different states.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pg_doorman.admin.snapshot import take as take_snapshot
from pg_doorman.app.logsetup import apply_log_filter
from pg_doorman.config import Config, ConfigError
from pg_doorman.stats.sockets import counted as counted_sockets

if TYPE_CHECKING:
    from pg_doorman.app.pooler import Pooler

logger = logging.getLogger("pg_doorman.cluster")

REQUEST_LIMIT = 1 << 16
# Snapshots of many clients are large; the reader's line limit must allow them.
REPLY_LIMIT = 1 << 30
CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerInfo:
    index: int
    count: int
    rundir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.rundir, f"w{index}.sock")


def share(total: int, index: int, count: int, *, at_least_one: bool = False) -> int:
    """Worker `index`'s part of a budget split across `count` workers."""
    part = total // count + (1 if index < total % count else 0)
    if at_least_one and total > 0:
        return max(part, 1)
    return part


_snapshot_numbers = itertools.count()
_last_snapshot: list[str] = []


def write_config_snapshot(rundir: str, config: Config) -> str:
    """`config` as loaded, in a new file of the run directory (only this user can
    read or write there). The one this process wrote before is removed: a worker too
    slow to answer that reload in time still finds its file until the next reload,
    whose request then follows it. The run directory goes when the supervisor stops."""
    path = os.path.join(rundir, f"config-{os.getpid()}-{next(_snapshot_numbers)}.pickle")
    with open(path, "xb") as file:
        pickle.dump(config, file, protocol=pickle.HIGHEST_PROTOCOL)
    for previous in _last_snapshot:
        with contextlib.suppress(OSError):
            os.unlink(previous)
    _last_snapshot[:] = [path]
    return path


def running_config_path(rundir: str) -> str:
    """Where the configuration the workers run now is kept (publish_running_config)."""
    return os.path.join(rundir, "config-running.pickle")


def publish_running_config(rundir: str, config: Config) -> None:
    """`config`, as the workers run it now (a reload's restart-only keys at their
    running values), for what starts or stops them later: a worker restarted after a
    crash starts from it rather than from the file, which may have changed since (or
    no longer load), and the supervisor waits its shutdown_timeout. Replaced whole."""
    _replace_whole(
        running_config_path(rundir), pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    )


def _replace_whole(path: str, data: bytes) -> None:
    """Write `path` so that a reader sees the old file or the new one, never half."""
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _pause_state_path(rundir: str) -> str:
    return os.path.join(rundir, "pause-state.json")


def publish_pause_state(rundir: str, paused_all: bool, databases: Iterable[str]) -> None:
    """What PAUSE and KILL hold until RESUME, for a worker restarted after a crash:
    it starts paused as the others are. Replaced whole."""
    state = {"all": paused_all, "databases": sorted(databases)}
    _replace_whole(_pause_state_path(rundir), json.dumps(state).encode())


def read_pause_state(rundir: str) -> tuple[bool, set[str]]:
    """The pause state publish_pause_state kept; nothing paused if there is none."""
    try:
        with open(_pause_state_path(rundir)) as file:
            state = json.load(file)
        return bool(state["all"]), {str(name) for name in state["databases"]}
    except FileNotFoundError:
        return False, set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("cannot read the pause state, starting unpaused: %s", exc)
        return False, set()


def read_config_snapshot(path: str) -> Config:
    try:
        with open(path, "rb") as file:
            config = pickle.load(file)
    except Exception as exc:  # unpickling fails in many ways; none may stop a worker
        raise ConfigError("", f"cannot read the configuration snapshot {path}: {exc}") from exc
    if not isinstance(config, Config):
        raise ConfigError("", f"{path} does not hold a configuration")
    return config


async def request(path: str, payload: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Send one request to the worker listening at `path` and return its reply."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path, limit=REPLY_LIMIT)
        try:
            writer.write(json.dumps(payload).encode() + b"\n")
            line = await reader.readline()
        finally:
            writer.close()
    if not line:
        raise ConnectionError(f"worker at {path} closed the connection")
    reply: dict[str, Any] = json.loads(line)
    return reply


class Cluster:
    """This worker's end: a control server, and calls to the other workers."""

    def __init__(self, pooler: Pooler, info: WorkerInfo) -> None:
        self.pooler = pooler
        self.info = info
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self.info.socket_path(self.info.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve, path, limit=REQUEST_LIMIT)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def others(
        self, payload: dict[str, Any], timeout: float | None = CALL_TIMEOUT
    ) -> list[dict[str, Any]]:
        """The replies of every other worker; a worker that is down is left out."""
        indexes = [i for i in range(self.info.count) if i != self.info.index]
        calls = [request(self.info.socket_path(i), payload, timeout) for i in indexes]
        replies = []
        for index, reply in zip(
            indexes, await asyncio.gather(*calls, return_exceptions=True), strict=True
        ):
            if isinstance(reply, BaseException):
                if isinstance(reply, asyncio.CancelledError):
                    raise reply
                logger.warning("worker %d did not answer %s: %s", index, payload["op"], reply)
                continue
            replies.append(reply)
        return replies

    def forward_cancel(
        self, owner: int, pid: int, secret: int, *, search: bool = True
    ) -> asyncio.Task[None]:
        """Pass a cancel request to worker `owner`; the task ends once that worker
        acted on it. `search`: if that worker doesn't have the client, it asks the
        others (a client an upgrade moved may be there)."""

        async def send() -> None:
            op = "cancel" if search else "cancel_here"
            payload = {"op": op, "pid": pid, "secret": secret}
            try:
                await request(self.info.socket_path(owner), payload, CALL_TIMEOUT)
            except (OSError, TimeoutError, ValueError) as exc:
                logger.warning("could not pass a cancel request to worker %d: %s", owner, exc)

        task = self.pooler.loop.create_task(send())
        self.pooler.track(task)
        return task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
                if not line:
                    return
                reply = await run_control(self.pooler, json.loads(line))
            except (ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
                logger.warning("bad control request: %s", exc)
                return
            try:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            except ConnectionError as exc:
                # Its sender waits only so long (a worker that was stopped answers late):
                # the request was carried out all the same.
                logger.info(
                    "control request carried out; its sender stopped waiting for the answer (%s)",
                    exc,
                )
        finally:
            writer.close()


async def run_control(pooler: Pooler, payload: dict[str, Any]) -> dict[str, Any]:
    """Carry out one control request in this worker; errors come back as {"error"}."""
    from pg_doorman.app.pooler import UnknownDatabase

    op = payload.get("op")
    database = payload.get("database")
    try:
        if op == "ping":
            return {}
        if op == "snapshot":
            sockets = await counted_sockets() if payload.get("sockets", True) else None
            return take_snapshot(pooler, sockets)
        if op in ("cancel", "cancel_here"):
            search = op == "cancel"
            sending = pooler.cancel_here(int(payload["pid"]), int(payload["secret"]), search=search)
            if sending is not None:
                await asyncio.shield(sending)  # answered once PostgreSQL has it
            return {}
        if op == "pause":
            pools = pooler.pause(database)
            return {
                "busy": sum(pool.active for pool in pools),
                "opening": sum(pool.connecting + pool.probing for pool in pools),
            }
        if op == "wait_paused":
            await pooler.wait_paused(pooler.pools_of(database))
            return {}
        if op == "resume":
            pooler.resume(database)
            return {}
        if op == "reconnect":
            pooler.reconnect(database)
            return {}
        if op == "kill":
            return {"killed": pooler.kill(database)}
        if op == "reload":
            snapshot = payload.get("snapshot")
            if snapshot is None:
                notes = pooler.reload_file()
            else:
                try:
                    config = read_config_snapshot(str(snapshot))
                except ConfigError as exc:
                    # Whoever asked may have stopped waiting: say it here too.
                    logger.error("reload failed, the old configuration stays: %s", exc)
                    raise
                notes = pooler.apply_config(config)
            if pooler.cluster is not None:
                try:
                    publish_running_config(pooler.cluster.info.rundir, pooler.config)
                except OSError as exc:
                    logger.warning("cannot keep the reloaded configuration: %s", exc)
            return {"notes": notes}
        if op == "log_level":
            apply_log_filter(str(payload["value"]))
            return {}
    except (UnknownDatabase, ConfigError, ValueError) as exc:
        return {"error": str(exc)}
    return {"error": f"unknown control request {op!r}"}
