"""Logging: human-readable text or one JSON object per line (-F structured), to stderr
or, with general.syslog_prog_name, to the local syslog socket."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from typing import Final, TextIO

LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}


# Characters of a log message longer than this are left out (the rest is counted): one
# client's 10 KB user name or long statement must not take that much room per line.
MESSAGE_LIMIT: Final = 4096
# What would start a new line for some reader (str.splitlines, a terminal, syslog) or
# drive a terminal: C0 and C1 control characters, DEL, the Unicode line separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(message: str) -> str:
    """`message` as one line of printable text, at most MESSAGE_LIMIT characters (plus
    a count of those left out): control characters become escapes, as in repr(), so
    that a name or statement a client sent cannot forge a log line of its own."""
    if len(message) > MESSAGE_LIMIT:
        left_out = len(message) - MESSAGE_LIMIT
        message = f"{message[:MESSAGE_LIMIT]}... ({left_out} more characters)"
    if message.isprintable():  # nearly always: skip the search
        return message
    return _UNSAFE.sub(_escaped, message)


def _traceback_after(formatter: logging.Formatter, record: logging.LogRecord, line: str) -> str:
    """`line` followed by the record's traceback and stack, as logging.Formatter.format
    adds them (the traceback text is kept on the record, as it does)."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        if line[-1:] != "\n":
            line += "\n"
        line += record.exc_text
    if record.stack_info:
        if line[-1:] != "\n":
            line += "\n"
        line += formatter.formatStack(record.stack_info)
    return line


# "%03d" of each whole number of milliseconds: a lookup, where formatting one with a
# width costs a line as much as its level, logger name and message together.
_MILLISECOND_TEXTS: Final = tuple(f"{millis:03d}" for millis in range(1000))


def _milliseconds(msecs: float) -> str:
    """A record's milliseconds (a float) as "%03d" formats them: truncated, 3 digits."""
    if 0.0 <= msecs < 1000.0:
        return _MILLISECOND_TEXTS[int(msecs)]
    return f"{int(msecs):03d}"


class TextFormatter(logging.Formatter):
    """`2026-01-01 12:00:00,123 INFO    [w1] pg_doorman.client: message`, or without the
    time and the level's padding for syslog, which stamps its own (`timestamp=False`).
    The message is made one line (one_line); a traceback still follows on lines of its
    own. The same text as Python's Formatter makes with the format string passed to it
    here, built without its interpreted steps: each client's connection and disconnection is a line,
    and the date and time part is formatted once per second, not once per line."""

    def __init__(self, worker: int | None = None, *, timestamp: bool = True) -> None:
        tag = "" if worker is None else f"[w{worker}] "
        if timestamp:
            fmt = f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s"
        else:
            fmt = f"%(levelname)s {tag}%(name)s: %(message)s"
        super().__init__(fmt)
        self.tag = tag
        self.timestamp = timestamp
        # The second last formatted and its local date and time, swapped as one object so
        # that threads formatting at once never pair a second with another one's text.
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        record.message = message = one_line(record.getMessage())
        if self.timestamp:
            created = record.created
            second = self._second
            if second[0] != int(created):  # time.localtime rounds down, as int() does here
                second = (
                    int(created),
                    time.strftime(self.default_time_format, self.converter(created)),
                )
                self._second = second
            # Formatter.formatTime's "%s,%03d" with record.msecs; "%-7s" of the level.
            record.asctime = asctime = f"{second[1]},{_milliseconds(record.msecs)}"
            line = f"{asctime} {record.levelname.ljust(7)} {self.tag}{record.name}: {message}"
        else:
            line = f"{record.levelname} {self.tag}{record.name}: {message}"
        if record.exc_info or record.exc_text or record.stack_info:
            return _traceback_after(self, record, line)
        return line


# json.dumps(value, ensure_ascii=False) of a str, without the encoder object json.dumps
# builds on each call with a keyword argument.
_json_string: Final = json.encoder.encode_basestring


class StructuredFormatter(logging.Formatter):
    """One JSON object per line: what json.dumps(..., ensure_ascii=False) makes of
    {timestamp, level, logger, message, pid[, worker][, exception]}, written directly;
    the date and time part is formatted once per second."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker_field = "" if worker is None else f', "worker": {int(worker)}'
        self._second: tuple[int, str] = (-1, "")  # as TextFormatter's, in UTC

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        second = self._second
        if second[0] != int(created):
            second = (int(created), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)))
            self._second = second
        pid = record.process
        # Escaped, not only JSON-quoted: a reader printing the decoded message (jq -r)
        # must not see lines a client wrote.
        message = _json_string(one_line(record.getMessage()))
        line = (
            f'{{"timestamp": "{second[1]}.{_milliseconds(record.msecs)}Z",'
            f' "level": {_json_string(record.levelname)},'
            f' "logger": {_json_string(record.name)},'
            f' "message": {message},'
            f' "pid": {"null" if pid is None else int(pid)}{self._worker_field}'
        )
        if record.exc_info:
            line += f', "exception": {_json_string(self.formatException(record.exc_info))}'
        return line + "}"


class LineHandler(logging.StreamHandler[TextIO]):
    """Python's StreamHandler writing the same line the same way (one write of the line
    and its newline, then a flush, under the handler's lock; a failure goes to
    handleError), without the interpreted calls in between (filter, acquire, emit,
    format, flush and their lock again): each client's connection and disconnection
    is a line. A handler given filters takes Python's path."""

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filters:
            return bool(super().handle(record))
        lock = self.lock
        if lock is None:  # made by Handler.__init__; only a subclass could drop it
            return bool(super().handle(record))
        with lock:
            try:
                formatter = self.formatter
                line = formatter.format(record) if formatter else self.format(record)
                stream = self.stream
                stream.write(line + self.terminator)
                stream.flush()
            except RecursionError:  # as StreamHandler.emit: not reported as a log failure
                raise
            except Exception:
                self.handleError(record)
        return True


def skip_unused_record_fields() -> None:
    """Stop building the LogRecord fields that no format of ours prints: the caller's
    file, line and function (a walk up the stack per record), the thread and its name,
    the multiprocessing process name and, from Python 3.12, the asyncio task name.
    These are the standard library's own switches for it; the process id stays (the
    structured and syslog formats show it). Each client's connection and disconnection
    line is a record: this is most of what such a line costs."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]


def parse_level(name: str) -> int:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(LEVELS)}") from None


SYSLOG_SOCKET_ENV = "PG_DOORMAN_SYSLOG_SOCKET"
DEFAULT_SYSLOG_SOCKET = "/dev/log"


class SyslogFormatter(logging.Formatter):
    """`ident[pid]: ` before what `inner` makes of the record. The pid is the record's,
    so it stays right in a process forked after logging was set up (daemon mode)."""

    def __init__(self, ident: str, inner: logging.Formatter) -> None:
        super().__init__()
        self.ident = ident
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.ident}[{record.process}]: {self.inner.format(record)}"


class _SyslogHandler(logging.handlers.SysLogHandler):
    append_nul = False  # today's syslog daemons take the datagram as the message
    _failing = False  # the last record could not be sent
    _sent = True

    def emit(self, record: logging.LogRecord) -> None:
        self._sent = True
        super().emit(record)  # failures end in handleError
        if self._sent:
            self._failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        # A syslog daemon that went away: one line on stderr, not a traceback per record.
        self._sent = False
        if not self._failing:
            self._failing = True
            print(f"pg_doorman: cannot write to syslog at {self.address}", file=sys.stderr)


def syslog_socket_path() -> str:
    return os.environ.get(SYSLOG_SOCKET_ENV) or DEFAULT_SYSLOG_SOCKET


def _open_syslog(ident: str, fmt: str, worker: int | None) -> logging.Handler | None:
    """A handler writing to the syslog socket, or None (said on stderr, except in a
    worker, whose supervisor already said it) if nothing listens there."""
    path = syslog_socket_path()
    socktype: socket.SocketKind | None = None
    error: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as probe:
                probe.connect(path)
        except OSError as exc:
            error = error or exc
            continue
        socktype = kind
        break
    if socktype is None:
        if worker is None:
            reason = error.strerror if error is not None and error.strerror else error
            print(
                f"pg_doorman: cannot log to syslog at {path} ({reason}): logging to stderr",
                file=sys.stderr,
            )
        return None
    handler = _SyslogHandler(
        address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON, socktype=socktype
    )
    inner: logging.Formatter
    if fmt == "structured":
        inner = StructuredFormatter(worker)
    else:
        inner = TextFormatter(worker, timestamp=False)
    handler.setFormatter(SyslogFormatter(ident, inner))
    return handler


# The stderr handler of a process that logs to syslog too, or that becomes a daemon:
# it goes once the process serves (see stderr_done).
_stderr_until_serving: logging.Handler | None = None


def setup_logging(
    level: str = "info",
    fmt: str = "text",
    worker: int | None = None,
    *,
    syslog_ident: str | None = None,
) -> bool:
    """Log to stderr, or to syslog with `syslog_ident`; `worker`: the index of a worker
    process, shown on each line. The main process also logs to stderr until it serves
    (stderr_done), so that what stops it from starting shows where it was started.
    True if the log goes to syslog."""
    global _stderr_until_serving
    handler = LineHandler(sys.stderr)
    handler.setFormatter(
        StructuredFormatter(worker) if fmt == "structured" else TextFormatter(worker)
    )
    syslog = _open_syslog(syslog_ident, fmt, worker) if syslog_ident else None
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    if syslog is None:
        root.handlers[:] = [handler]
        _stderr_until_serving = None
    elif worker is None:
        root.handlers[:] = [syslog, handler]
        _stderr_until_serving = handler
    else:
        root.handlers[:] = [syslog]
    root.setLevel(parse_level(level))
    set_startup_level(level)
    return syslog is not None


def stderr_done(*, detached: bool) -> None:
    """The process serves: stop logging to stderr if the log goes to syslog, or if the
    process is a daemon (`detached`), whose stderr is /dev/null from now on."""
    global _stderr_until_serving
    root = logging.getLogger()
    if detached:
        for handler in root.handlers[:]:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                root.removeHandler(handler)
        if not root.handlers:  # not even Python's last resort: it writes to stderr
            root.addHandler(logging.NullHandler())
    elif _stderr_until_serving is not None:
        root.removeHandler(_stderr_until_serving)
    _stderr_until_serving = None


_startup_level = "info"


def set_startup_level(level: str) -> None:
    """Remember the level chosen at startup, which `SET log_level = 'default'` restores."""
    global _startup_level
    _startup_level = level


def apply_log_filter(text: str) -> None:
    """Change logging at runtime: `level`, `default`, or a comma list mixing a level with
    `logger=level` overrides (`info,pg_doorman.pool=debug`). ValueError if invalid; then
    nothing changes."""
    root_level: int | None = None
    overrides: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, level = part.partition("=")
        if sep:
            name = name.strip()
            if not name.startswith("pg_doorman"):
                raise ValueError(f"unknown logger {name!r}; loggers are named pg_doorman.*")
            overrides[name] = parse_level(level.strip())
        elif part.lower() == "default":
            root_level = parse_level(_startup_level)
        else:
            root_level = parse_level(part)
    if root_level is None and not overrides:
        raise ValueError("empty log filter")
    if root_level is not None:
        logging.getLogger().setLevel(root_level)
        for name, existing in logging.Logger.manager.loggerDict.items():
            if name.startswith("pg_doorman") and isinstance(existing, logging.Logger):
                existing.setLevel(logging.NOTSET)
    for name, level_no in overrides.items():
        logging.getLogger(name).setLevel(level_no)
