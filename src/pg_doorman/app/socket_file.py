"""The Unix socket file `<unix_socket_dir>/.s.PGSQL.<port>`: bound without stealing a
live one, created with its mode from the start, removed when its listener stops.

A file left by a pooler that crashed refuses connections and is replaced; one another
running process listens on is left alone and the start fails, as with PostgreSQL's
lock file. At exit the file is removed only if it is still the one this process
listened on, and not after an upgrade handed the listener to the new process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass


def bind_unix_listener(sock: socket.socket, path: str, mode: int) -> None:
    """Bind `sock` to `path` with permissions `mode`, replacing a stale socket file."""
    _clear_stale(path)
    # bind() creates the file with 0o777 & ~umask: masked so that until the chmod
    # below nobody gets more access than `mode` gives.
    previous = os.umask(0o777)
    os.umask(previous | (~mode & 0o777))
    try:
        sock.bind(path)
    finally:
        os.umask(previous)
    os.chmod(path, mode)


def _clear_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        return  # not ours to remove: bind() says the address is in use
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: left behind by a process that did not exit cleanly
        except OSError:
            return  # cannot tell (no permission): bind() reports the conflict
        else:
            raise OSError(errno.EADDRINUSE, "another process is listening on it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True)
class SocketFile:
    """A socket file a listener of this process is bound to, as found on disk."""

    path: str
    device: int
    inode: int

    @classmethod
    def of(cls, listener: socket.socket) -> SocketFile | None:
        """The file `listener` (bound here, or handed over by an upgrade) listens on."""
        if listener.family != socket.AF_UNIX:
            return None
        path = listener.getsockname()
        if not isinstance(path, str) or not path or path.startswith("\0"):
            return None
        try:
            info = os.lstat(path)
        except OSError:
            return None
        return cls(path, info.st_dev, info.st_ino)

    def remove(self) -> None:
        """Remove the file, unless another process has bound the path since."""
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                os.unlink(self.path)


def socket_files(listeners: list[socket.socket]) -> list[SocketFile]:
    return [found for found in map(SocketFile.of, listeners) if found is not None]
