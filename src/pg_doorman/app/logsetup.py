"""Logging: human-readable text or one JSON object per line (-F structured)."""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}


class StructuredFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def parse_level(name: str) -> int:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(LEVELS)}") from None


def setup_logging(level: str = "info", fmt: str = "text", worker: int | None = None) -> None:
    """Log to stderr; `worker`: the index of a worker process, shown on each line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "structured":
        handler.setFormatter(StructuredFormatter(worker))
    else:
        tag = "" if worker is None else f"[w{worker}] "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parse_level(level))
    set_startup_level(level)


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
