"""Several worker processes behind one port (`general.workers` > 1).

The supervisor starts the workers, restarts one that dies, reloads them all on SIGHUP
(the file read once, here: app.cluster) and stops them all on SIGINT/SIGTERM (a
second one, or SIGQUIT, stops them at once: the workers get SIGQUIT). It owns
the listening sockets and hands each accepted connection to the least-loaded worker
(app.dispatch). Pool budgets are split between workers (cluster.share), and the admin
console and /metrics, which the supervisor serves, cover all of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence

from pg_doorman.admin.snapshot import Snapshot, merge, resident_memory
from pg_doorman.app import daemon
from pg_doorman.app.cluster import (
    CALL_TIMEOUT,
    WorkerInfo,
    publish_running_config,
    read_config_snapshot,
    request,
    running_config_path,
    write_config_snapshot,
)
from pg_doorman.app.dispatch import Dispatcher, LoadBoard, channel_pair
from pg_doorman.app.migration import Immigration, refuse_moved
from pg_doorman.app.socket_file import socket_files
from pg_doorman.app.upgrade import (
    Upgrade,
    announce_ready,
    listeners_for,
    take_migration_channel,
)
from pg_doorman.config import Config, ConfigError
from pg_doorman.net.session_state import SessionState
from pg_doorman.stats.sockets import add_up
from pg_doorman.stats.sockets import counted as counted_sockets

logger = logging.getLogger("pg_doorman.supervisor")

READY_TIMEOUT = 30.0
RESTART_DELAY = 1.0
# A client an upgrade's old process handed over, that no worker could take at once
# (their channels full, or none serving): tried again this often, for this long.
MOVED_RETRY = 0.02
MOVED_PATIENCE = 10.0


def worker_count(config: Config) -> int:
    return config.general.workers or os.cpu_count() or 1


class Supervisor:
    def __init__(
        self,
        config: Config,
        log_level: str,
        log_format: str,
        *,
        upgrade_argv: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.upgrade = Upgrade(upgrade_argv, config.source) if upgrade_argv is not None else None
        self.count = worker_count(config)
        self.log_args = ["-l", log_level, "-F", log_format]
        self.rundir = tempfile.mkdtemp(prefix="pg_doorman-")
        self.info = WorkerInfo(index=-1, count=self.count, rundir=self.rundir)
        self.workers: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.stopping = False
        self.dispatcher: Dispatcher | None = None
        # The supervisor's end of each worker's dispatch channel, until that worker serves.
        self._channels: list[socket.socket | None] = [None] * self.count
        self._stop = asyncio.Event()
        self._stop_signals = 0
        # The workers are stopped without waiting for transactions (SIGQUIT to them).
        self._immediate = False
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._reloading = asyncio.Lock()
        # The channel from the process this one replaces (binary upgrade): its clients
        # arrive on it, and the workers send cancel requests for its clients back.
        self._previous = take_migration_channel()
        self._immigration: Immigration | None = None
        # Its clients that no worker could take yet, oldest first (descriptor, state,
        # when to give up); no more are read meanwhile (Immigration.pause).
        self._held: collections.deque[tuple[int, bytes, float]] = collections.deque()
        self._held_timer: asyncio.TimerHandle | None = None

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        # First: a stop asked for while the workers start is carried out once they run.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        loop.add_signal_handler(signal.SIGUSR2, self._on_upgrade)
        try:
            listeners = listeners_for(self.config.general)
            self._listeners = listeners
            # Removed at exit unless an upgrade's new process took the listeners over.
            files = socket_files(listeners)
            board = LoadBoard(os.path.join(self.rundir, "load"), self.count, create=True)
            # Every worker starts from this reading of the file, a restarted one too
            # (the workers replace it with each reload they apply).
            publish_running_config(self.rundir, self.config)
            self.dispatcher = Dispatcher(loop, listeners, board, self.count)
            for index in range(self.count):
                await self._spawn(index)
            if not await self._wait_ready():
                return 1
            for index in range(self.count):
                self._attach(index)
            if self._previous is not None:
                # Clients of the process this one replaces: each to its worker.
                self._immigration = Immigration(loop, self._previous, self._arrived)
                self._immigration.start()
            self.dispatcher.start()
            web = None
            if self.config.web.enabled:
                from pg_doorman.web.server import WebServer

                web = WebServer(
                    self.snapshot,
                    self.healthy,
                    self.config.web.host,
                    self.config.web.port,
                    self.config.general.tcp_socket_buffer_size,
                )
                await web.start()
            # Logged once everything serves, /metrics included.
            logger.info("all %d workers ready", self.count)
            announce_ready()
            watchers = [loop.create_task(self._watch(index)) for index in range(self.count)]
            await self._stop.wait()
            logger.info("stopping %d workers", self.count)
            channel = None if self.upgrade is None else self.upgrade.take_channel()
            if channel is not None:
                # An upgrade's new process serves: the workers' clients go there.
                for index in range(self.count):
                    self.dispatcher.send_successor(index, channel.fileno())
                channel.close()
            if self._immigration is not None:
                self._immigration.stop()
            self._refuse_held("the pooler is shutting down")
            self.stopping = True
            self.dispatcher.stop_listening()
            await self._stop_workers()
            for watcher in watchers:
                watcher.cancel()
            if web is not None:
                web.close()
            if self.upgrade is None or self.upgrade.successor is None:
                for socket_file in files:
                    socket_file.remove()
            return 1 if self._immediate else 0
        except OSError as exc:
            if exc.strerror and exc.strerror.startswith("cannot listen"):
                logger.error("%s", exc.strerror)
            else:
                logger.error("cannot start workers: %s", exc)
            self.stopping = True
            await self._stop_workers()
            return 1
        finally:
            self._refuse_held("the pooler is shutting down")
            if self._previous is not None:
                self._previous.close()
            if self.dispatcher is not None:
                self.dispatcher.close()
                self.dispatcher.board.close()
            for channel in self._channels:
                if channel is not None:
                    channel.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _on_stop_signal(self, signum: int) -> None:
        self._stop_signals += 1
        name = signal.Signals(signum).name
        if signum != signal.SIGQUIT and self._stop_signals == 1:
            logger.info("received %s: stopping the workers gracefully", name)
        elif not self._immediate:
            logger.warning("received %s: stopping the workers now, transactions are cut", name)
            self._immediate = True
            if self.stopping:  # they were told to stop gracefully: now at once
                self._forward(signal.SIGQUIT)
        self._stop.set()

    def _on_reload(self) -> None:
        if self._stop.is_set():
            logger.info("SIGHUP ignored: the pooler is shutting down")
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        """SIGHUP: read the config file once and have every running worker apply that
        reading. One reload at a time, so that the workers apply them in order."""
        from pg_doorman.app.cli import load_checked_config

        async with self._reloading:
            if self.stopping:
                return
            try:
                config = load_checked_config(self.config.source)
            except ConfigError as exc:
                logger.error("SIGHUP: reload failed, the old configuration stays: %s", exc)
                return
            for warning in config.warnings:
                logger.warning("config: %s", warning)
            payload = {"op": "reload", "snapshot": write_config_snapshot(self.rundir, config)}
            indexes = [
                index
                for index, worker in enumerate(self.workers)
                if worker is not None and worker.returncode is None
            ]
            replies = await asyncio.gather(
                *(request(self.info.socket_path(i), payload, CALL_TIMEOUT) for i in indexes),
                return_exceptions=True,
            )
            for index, reply in zip(indexes, replies, strict=True):
                if isinstance(reply, asyncio.CancelledError):
                    raise reply
                if isinstance(reply, TimeoutError):
                    logger.warning(
                        "worker %d did not answer the reload within %.0f s; it applies it"
                        " when it runs on",
                        index,
                        CALL_TIMEOUT,
                    )
                elif isinstance(reply, BaseException):
                    logger.warning("worker %d did not answer the reload: %r", index, reply)
                elif "error" in reply:
                    logger.error("worker %d: reload failed: %s", index, reply["error"])

    def _on_upgrade(self) -> None:
        if self.upgrade is None:
            logger.warning("SIGUSR2: only the process started from the command line upgrades")
            return
        task = asyncio.get_running_loop().create_task(self.upgrade.run(self._listeners, self._stop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- workers ------------------------------------------------------------

    async def _spawn(self, index: int) -> None:
        assert self.dispatcher is not None
        self.dispatcher.reset(index)
        ours, theirs = channel_pair()
        old = self._channels[index]
        if old is not None:
            old.close()
        self._channels[index] = ours
        args = [
            sys.executable, "-m", "pg_doorman", self.config.source, *self.log_args,
            "--worker", f"{index}/{self.count}", "--rundir", self.rundir,
            "--dispatch-fd", str(theirs.fileno()), "--supervisor-pid", str(os.getpid()),
            "--config-snapshot", running_config_path(self.rundir),
        ]  # fmt: skip
        fds = [theirs.fileno()]
        previous = self._previous
        if previous is not None:
            # Clients of the old process may sit in any worker, this one's next
            # incarnation included (see Pooler.cancel_here).
            args.append("--moved-clients")
            if previous.fileno() != -1:
                args += ["--previous-fd", str(previous.fileno())]
                fds.append(previous.fileno())
        # A daemon's stdout and stderr are the terminal it was started from until it
        # serves: a worker keeping them would write there long after.
        output = asyncio.subprocess.DEVNULL if daemon.active() else None
        try:
            self.workers[index] = await asyncio.create_subprocess_exec(
                *args, pass_fds=fds, stdout=output, stderr=output
            )
        finally:
            theirs.close()

    def _attach(self, index: int) -> None:
        """Worker `index` answers: it gets connections from now on."""
        channel = self._channels[index]
        assert self.dispatcher is not None and channel is not None
        self._channels[index] = None
        self.dispatcher.attach(index, channel)

    async def _wait_ready(self) -> bool:
        """Every worker answers on its control socket (False if one died first)."""
        for index in range(self.count):
            if not await self._ready(index):
                self.stopping = True
                await self._stop_workers()
                return False
        return True

    async def _ready(self, index: int) -> bool:
        """Worker `index` answers on its control socket (False if it died first or
        did not answer within READY_TIMEOUT)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while True:
            worker = self.workers[index]
            if worker is None or worker.returncode is not None:
                logger.error("worker %d exited while starting", index)
                return False
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                await request(self.info.socket_path(index), {"op": "ping"}, 1.0)
                return True
            if loop.time() > deadline:
                logger.error("worker %d did not start within %.0fs", index, READY_TIMEOUT)
                return False
            await asyncio.sleep(0.05)

    async def _watch(self, index: int) -> None:
        """Restart worker `index` whenever it exits while the pooler is running."""
        while True:
            worker = self.workers[index]
            assert worker is not None
            code = await worker.wait()
            if self.stopping:
                return
            assert self.dispatcher is not None
            self.dispatcher.detach(index)  # its clients are gone; send it no more
            logger.error("worker %d exited with code %s; starting a new one", index, code)
            await asyncio.sleep(RESTART_DELAY)
            if self.stopping:
                return
            await self._spawn(index)
            if await self._ready(index):
                self._attach(index)
            elif not self.stopping:
                # Not answering: end it; the next round of this loop starts another.
                stuck = self.workers[index]
                if stuck is not None and stuck.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        stuck.kill()

    def _arrived(self, fd: int, family: int, session: SessionState) -> None:
        """A client of the process this one replaces: to the least-loaded worker, as a
        new connection goes (cancel requests for its id find it there: see
        Pooler.cancel_here)."""
        assert self.dispatcher is not None
        try:
            state = session.encode()
            if self._held or not self.dispatcher.send_moved(fd, state):
                # The workers' channels are full (or no worker serves right now): it
                # waits here, after those already waiting, and no more are read.
                deadline = asyncio.get_running_loop().time() + MOVED_PATIENCE
                self._held.append((fd, state, deadline))
                if self._immigration is not None:
                    self._immigration.pause()
                self._arm_held()
                return
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)

    def _arm_held(self) -> None:
        if self._held_timer is None:
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(MOVED_RETRY, self._send_held)

    def _send_held(self) -> None:
        """Pass on the clients that waited for a worker, in order; read on once all
        went."""
        self._held_timer = None
        assert self.dispatcher is not None
        now = asyncio.get_running_loop().time()
        while self._held:
            fd, state, deadline = self._held[0]
            if self.dispatcher.send_moved(fd, state):
                os.close(fd)
            elif now >= deadline:
                refuse_moved(fd, "no worker takes it")
            else:
                self._arm_held()
                return
            self._held.popleft()
        if self._immigration is not None:
            self._immigration.resume()

    def _refuse_held(self, why: str) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        while self._held:
            fd, _, _ = self._held.popleft()
            refuse_moved(fd, why)

    def _forward(self, signum: int) -> None:
        for worker in self.workers:
            if worker is not None and worker.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.send_signal(signum)

    def _running_config(self) -> Config:
        """The configuration the workers run: the last reload they applied (SIGHUP or
        the console's RELOAD), else the one they started with."""
        try:
            return read_config_snapshot(running_config_path(self.rundir))
        except ConfigError:
            return self.config

    async def _stop_workers(self) -> None:
        """SIGTERM (graceful: transactions finish) or SIGQUIT (at once), then SIGKILL
        after the timeout."""
        self._forward(signal.SIGQUIT if self._immediate else signal.SIGTERM)
        timeout = self._running_config().general.shutdown_timeout / 1000.0 + 5.0
        running = [w for w in self.workers if w is not None and w.returncode is None]
        if not running:
            return
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(w.wait()) for w in running], timeout=timeout
        )
        if pending:
            logger.warning("%d workers did not stop in time: killing them", len(pending))
            for worker in running:
                if worker.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.kill()
            await asyncio.wait(pending)

    # ---- what /metrics and /health see ----------------------------------------

    async def snapshot(self) -> Snapshot:
        calls = [
            request(self.info.socket_path(i), {"op": "snapshot"}, CALL_TIMEOUT)
            for i in range(self.count)
        ]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        snapshots: list[Snapshot] = []
        for index, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                logger.warning("worker %d did not send its metrics: %s", index, reply)
            else:
                snapshots.append(reply)
        if not snapshots:
            raise RuntimeError("no worker answered")
        merged = merge(snapshots)
        merged["memory"] += resident_memory()  # the supervisor's own
        merged["sockets"] = add_up([merged["sockets"], await counted_sockets()])
        return merged

    def healthy(self) -> bool:
        return not self.stopping and all(
            w is not None and w.returncode is None for w in self.workers
        )
