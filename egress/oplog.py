"""Operational logging (start, reload, errors) as JSON lines on stderr.

Per-connection records go through :mod:`egress.connlog` instead; this is for the rare events an
operator greps for at 3 a.m.
"""

from __future__ import annotations

import json
import logging
from typing import Any

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                plain = isinstance(value, int | float | bool | None | list | tuple | dict)
                entry[key] = value if plain else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def configure(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per scrape; metrics scrapes are not news.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
