"""Daemon mode (`-d`): run in the background, the PID in `general.daemon_pid_file`.

The command detaches (fork, setsid, fork again, umask 027, stdin from /dev/null) but
keeps its stdout and stderr, and waits: until the daemon serves, what stops it from
starting (a port in use, an unwritable PID file) is logged where it was started, and
the command exits with the daemon's exit code. Once the daemon serves, its stdout and
stderr go to /dev/null and the command exits 0.

A process an upgrade starts (app.upgrade) from a daemon does not fork again: it is
already detached, and the old daemon does not wait for it. It takes the PID file over
once it serves, before telling the old process, which then leaves the file alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

from pg_doorman.app import logsetup

logger = logging.getLogger("pg_doorman.daemon")

# What the daemon writes on the pipe to the command that started it: READY once it
# serves, else its exit code as one byte.
READY = b"\x00"
UMASK = 0o027


class PidFileError(Exception):
    pass


@dataclass
class _Daemon:
    pid_file: str
    # The write end of the pipe to the command that started this daemon; None once
    # told, and in a process an upgrade started.
    launcher: int | None
    # The PID file is written when the process serves (a process an upgrade started).
    write_when_serving: bool


_daemon: _Daemon | None = None


def running_pid(path: str) -> int | None:
    """The PID the file names if that process is a live pg_doorman, else None (no
    file, or a stale one)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            pid = int(f.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return None
    except OSError as exc:
        raise PidFileError(f"cannot read the PID file {path}: {exc.strerror}") from exc
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    if not os.path.isdir("/proc/self"):
        return pid  # no /proc to tell what runs there: a live PID is taken for the daemon
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except FileNotFoundError:
        return None  # it just exited
    except OSError:
        return pid
    # A zombie has an empty command line; another program reusing the PID, another name.
    return pid if b"pg_doorman" in command else None


def write_pid_file(path: str) -> None:
    """This process's PID, replacing the file whole (a reader never sees half of it)."""
    partial = f"{path}.{os.getpid()}.new"
    try:
        with open(partial, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise PidFileError(f"cannot write the PID file {path}: {exc.strerror}") from exc


def _remove_pid_file_if_ours(path: str) -> None:
    """At exit: a file naming another process (the one an upgrade started) stays."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            named = f.read().strip()
    except OSError:
        return
    if named == str(os.getpid()):
        with contextlib.suppress(OSError):
            os.unlink(path)


def detach(pid_file: str) -> int | None:
    """Become a daemon. In the command that was started: wait for the daemon to serve
    and return the exit code for the command (None is never returned there); in the
    daemon: None. PidFileError if the PID file names a running pg_doorman."""
    global _daemon
    running = running_pid(pid_file)
    if running is not None:
        raise PidFileError(f"pg_doorman is already running with PID {running} ({pid_file})")
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    first = os.fork()
    if first != 0:
        os.close(write_end)
        os.waitpid(first, 0)
        return _wait_for_daemon(read_end)
    os.close(read_end)
    try:
        os.setsid()  # no controlling terminal: a closed terminal's SIGHUP never comes
        if os.fork() != 0:
            os._exit(0)  # the daemon is reparented; its parent needs no cleanup
    except BaseException:
        os._exit(1)
    os.umask(UMASK)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    _daemon = _Daemon(pid_file, write_end, write_when_serving=False)
    write_pid_file(pid_file)
    return None


def _wait_for_daemon(read_end: int) -> int:
    try:
        answer = os.read(read_end, 1)
    except KeyboardInterrupt:
        print("pg_doorman: interrupted; the daemon may still be starting", file=sys.stderr)
        return 130
    finally:
        os.close(read_end)
    if answer == READY:
        return 0
    return answer[0] if answer else 1  # nothing said: it died (a traceback says why)


def adopt(pid_file: str) -> None:
    """This process was started by an upgrade of a daemon: it is one already."""
    global _daemon
    _daemon = _Daemon(pid_file, None, write_when_serving=True)


def active() -> bool:
    return _daemon is not None


def forked_here() -> bool:
    """This process detached itself (and is not an upgrade's successor)."""
    return _daemon is not None and not _daemon.write_when_serving


def serving() -> None:
    """The process serves: a daemon takes the PID file (after an upgrade), closes its
    stdout and stderr and lets the command that started it exit 0."""
    if _daemon is None:
        logsetup.stderr_done(detached=False)
        return
    if _daemon.write_when_serving:
        try:
            write_pid_file(_daemon.pid_file)
        except PidFileError as exc:
            logger.error("%s", exc)
    logsetup.stderr_done(detached=True)
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    _tell_launcher(READY)


def finish(code: int) -> None:
    """The process exits with `code`: a daemon that never served passes it on to the
    command that started it, and the PID file goes if it names this process."""
    if _daemon is None:
        return
    _tell_launcher(bytes([code if 0 < code < 256 else 1]))
    _remove_pid_file_if_ours(_daemon.pid_file)


def _tell_launcher(message: bytes) -> None:
    assert _daemon is not None
    fd, _daemon.launcher = _daemon.launcher, None
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the command was interrupted
        os.write(fd, message)
    os.close(fd)
