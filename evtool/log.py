"""Logging through the standard library: one setup for every command, text or JSON lines on stderr.

Library modules log to `logging.getLogger(__name__)` (names under `evtool.`); the CLI calls
`setup` once with --log-level/--log-format. A text line is `<UTC time> <LEVEL> <message>`; a JSON
line is one object with time, level, logger, message and whatever `extra` fields the call gave
(so a log pipeline can filter on `path` or `status` without parsing the message).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
# LogRecord attributes that are not `extra` fields
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """`2026-11-23T09:00:00.123Z INFO message`; a traceback, when there is one, below it."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the call's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        from .output import json_text

        obj: dict[str, Any] = {"time": _utc(record), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                obj[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json_text(obj)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send evtool's (and aiohttp's access) log records to stderr at `level`, as `fmt` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors only
    for name in ("evtool", "aiohttp.access"):
        logging.getLogger(name).setLevel(level.upper())
