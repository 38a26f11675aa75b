"""Binary upgrade: a new pg_doorman process takes over the listening sockets.

On SIGUSR2 (or the admin console's UPGRADE) the process that owns the listening
sockets (the pooler, or the supervisor with several workers):

1. checks the config with the code now installed (`python -m pg_doorman CONFIG -t`);
   if that fails, the upgrade stops there and this process serves on;
2. starts its own command line again, handing over the listening sockets (their file
   descriptors, named in PG_DOORMAN_LISTEN_FDS), a pipe (PG_DOORMAN_READY_FD) on which
   the new process writes one byte once it serves, and the channel its clients move
   over (PG_DOORMAN_MIGRATION_FD; the byte says whether the new process reads it);
3. on that byte, stops accepting and shuts down gracefully: logged-in clients move to
   the new process with their sockets and sessions (app.migration), at once when idle,
   the others after their transaction; those that cannot move are disconnected and
   reconnect. The listening sockets are the same kernel objects in both processes, so
   no connection attempt is refused in between.

If the new process exits or stays silent for READY_TIMEOUT seconds, it is killed and
this process serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from pg_doorman.app import daemon
from pg_doorman.app.dispatch import bind_listeners
from pg_doorman.app.migration import channel_pair
from pg_doorman.config.schema import GeneralConfig

logger = logging.getLogger("pg_doorman.upgrade")

LISTEN_FDS = "PG_DOORMAN_LISTEN_FDS"
READY_FD = "PG_DOORMAN_READY_FD"
MIGRATION_FD = "PG_DOORMAN_MIGRATION_FD"
READY_TIMEOUT = 30.0
CHECK_TIMEOUT = 60.0

# Set once by take_inherited() in a process started by an upgrade.
_inherited: list[socket.socket] | None = None
_ready_fd: int | None = None
_migration: socket.socket | None = None
_takes_clients = False  # the migration channel was taken: this process reads it
# The byte a new process writes once it serves: "M" if it takes the old process's
# clients, "R" if not (a version without migration; its clients then reconnect).
READY_TAKING_CLIENTS = b"M"
READY = b"R"


def take_inherited() -> None:
    """Adopt the sockets and the readiness pipe a predecessor handed over (if any), and
    remove them from the environment so that worker processes don't see them."""
    global _inherited, _ready_fd, _migration
    fds = os.environ.pop(LISTEN_FDS, None)
    ready = os.environ.pop(READY_FD, None)
    migration = os.environ.pop(MIGRATION_FD, None)
    if ready:
        _ready_fd = int(ready)
    if migration:
        _migration = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, int(migration))
    if fds:
        _inherited = []
        for text in fds.split(","):
            sock = socket.socket(fileno=int(text))
            sock.setblocking(False)
            _inherited.append(sock)


def started_by_upgrade() -> bool:
    """This process took over from another (its clients may follow)."""
    return _migration is not None or _inherited is not None


def take_migration_channel() -> socket.socket | None:
    """The channel on which the replaced process sends its clients (taken once)."""
    global _migration, _takes_clients
    channel, _migration = _migration, None
    if channel is not None:
        _takes_clients = True
    return channel


def sd_notify(message: str) -> None:
    """Tell systemd (a `Type=notify` service) about this process, if it listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def listeners_for(general: GeneralConfig) -> list[socket.socket]:
    """The sockets handed over by an upgrade (taken once), else newly bound ones.
    Handed-over sockets keep their address: a changed host, port or unix_socket_dir
    needs a restart."""
    global _inherited
    inherited, _inherited = _inherited, None
    if inherited is not None:
        logger.info("serving on %d listening sockets handed over by an upgrade", len(inherited))
        return inherited
    return bind_listeners(general)


def announce_ready() -> None:
    """This process serves: tell systemd, and the process it replaces if any (a daemon
    takes the PID file over first, and lets the command that started it exit)."""
    global _ready_fd
    daemon.serving()
    # A daemon is not the process systemd started (Type=notify with -d).
    sd_notify(f"MAINPID={os.getpid()}\nREADY=1" if daemon.forked_here() else "READY=1")
    if _ready_fd is None:
        return
    fd, _ready_fd = _ready_fd, None
    with contextlib.suppress(OSError):  # the old process gave up waiting
        os.write(fd, READY_TAKING_CLIENTS if _takes_clients else READY)
    os.close(fd)


class Upgrade:
    """Runs at most one upgrade at a time for the process owning `listeners`."""

    def __init__(self, argv: Sequence[str], config_path: str) -> None:
        self.argv = list(argv)
        self.config_path = config_path
        self.running = False
        # Kept so that the Popen object is not collected while the new process runs.
        self.successor: subprocess.Popen[bytes] | None = None
        # This process's end of the channel its clients move over (app.migration),
        # once a successor serves.
        self.channel: socket.socket | None = None

    def take_channel(self) -> socket.socket | None:
        channel, self.channel = self.channel, None
        return channel

    async def run(self, listeners: Sequence[socket.socket], stop: asyncio.Event) -> None:
        """Hand `listeners` over to a new process, then set `stop` (this process then
        shuts down gracefully); on any failure this process serves on."""
        if self.running:
            logger.warning("SIGUSR2: an upgrade is already in progress")
            return
        if stop.is_set() or not listeners:
            logger.warning("SIGUSR2: not listening yet, or shutting down: no upgrade")
            return
        logger.info("SIGUSR2: upgrading to a new process")
        self.running = True
        try:
            if await self._config_is_valid() and await self._start_successor(listeners):
                stop.set()
        finally:
            self.running = False

    async def _config_is_valid(self) -> bool:
        check = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pg_doorman",
            self.config_path,
            "-t",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(check.communicate(), CHECK_TIMEOUT)
        except TimeoutError:
            check.kill()
            await check.wait()
            logger.error("upgrade: the config check did not finish; this process serves on")
            return False
        if check.returncode != 0:
            reason = stderr.decode(errors="replace").strip() or f"exit code {check.returncode}"
            logger.error("upgrade cancelled, this process serves on: %s", reason)
            return False
        return True

    async def _start_successor(self, listeners: Sequence[socket.socket]) -> bool:
        loop = asyncio.get_running_loop()
        fds = [sock.fileno() for sock in listeners]
        read_end, write_end = os.pipe()
        ours, theirs = channel_pair()
        env = dict(os.environ)
        env[LISTEN_FDS] = ",".join(str(fd) for fd in fds)
        env[READY_FD] = str(write_end)
        env[MIGRATION_FD] = str(theirs.fileno())
        try:
            # Not an asyncio subprocess: the event loop would kill it when this
            # process closes its transports on the way out.
            successor = subprocess.Popen(
                [sys.executable, "-m", "pg_doorman", *self.argv],
                stdin=subprocess.DEVNULL,
                pass_fds=(*fds, write_end, theirs.fileno()),
                env=env,
            )
        except OSError as exc:
            os.close(read_end)
            ours.close()
            logger.error("upgrade: cannot start a new process: %s", exc)
            return False
        finally:
            os.close(write_end)
            theirs.close()
        answered: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not answered.done():
                try:
                    answered.set_result(os.read(read_end, 1))
                except OSError:
                    answered.set_result(b"")

        loop.add_reader(read_end, readable)
        try:
            answer = await asyncio.wait_for(answered, READY_TIMEOUT)
        except TimeoutError:
            answer = None
        except BaseException:  # this process is stopping: no half-started successor
            successor.kill()
            successor.wait()
            ours.close()
            raise
        finally:
            loop.remove_reader(read_end)
            os.close(read_end)
        if answer:
            self.successor = successor
            if answer == READY_TAKING_CLIENTS:
                self.channel = ours
            else:
                ours.close()  # its clients are disconnected and reconnect
            sd_notify(f"MAINPID={successor.pid}")  # systemd follows the new process
            logger.info(
                "upgrade: new process %d serves; this one stops accepting and shuts down",
                successor.pid,
            )
            return True
        ours.close()
        if successor.poll() is None:
            successor.kill()
        code = successor.wait()
        why = "did not become ready in time" if answer is None else f"exited with {code}"
        logger.error("upgrade: the new process %s; this process serves on", why)
        return False
