"""Log configuration of the worker and the CLI: plain text or one JSON object a line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s %(message)s"
# Identical warnings and errors pass once per this interval, with a count.
REPEAT_INTERVAL_S = 60.0


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object with time, level, logger and message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Let one of each identical warning or error through per interval, with a count.

    Client libraries log every failed retry. With its broker stopped, a worker on
    2 cores logged about 100 ERROR lines a second from aiokafka's reconnect,
    metadata and fetch loops. A record
    is identical to an earlier one when its logger, level and formatted message
    are. The first passes with its exception. Repeats within `interval_seconds`
    are dropped and counted, and the first repeat after the interval passes with
    the count of the dropped ones. Records below WARNING always pass.
    """

    def __init__(self, interval_seconds: float = 60.0, max_keys: int = 1000) -> None:
        super().__init__()
        self.interval_seconds = interval_seconds
        self.max_keys = max_keys
        # Per identical record: when its current interval started, and how many
        # repeats were dropped since then. Dicts keep insertion order, so the
        # first key is the oldest one.
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, message)
        seen = self._seen.pop(key, None)
        if seen is None:
            self._remember(key, record.created, 0)
            return True
        started, dropped = seen
        if record.created - started < self.interval_seconds:
            self._remember(key, started, dropped + 1)
            return False
        self._remember(key, record.created, 0)
        if dropped:
            # NOTE: the count of an interval is logged only when the record comes
            # again after it, so the count of a last interval is never logged.
            record.msg = (
                f"{message} (repeated {dropped} more times in the last "
                f"{record.created - started:.0f} s)"
            )
            record.args = None
        return True

    def _remember(
        self, key: tuple[str, int, str], started: float, dropped: int
    ) -> None:
        self._seen[key] = (started, dropped)
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]


class RequestParseErrorFilter(logging.Filter):
    """Drop the request's own bytes from aiohttp's log of a request it could not parse.

    aiohttp (3.14) logs such a request with its exception, whose text quotes the
    start of the offending line: for an over-long header, that can be an
    `Authorization` or `X-API-Key` value. The record keeps the error's class, the
    HTTP status and the client's address, and loses the exception.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            original = record.getMessage()
            record.msg = "%s: %s (status %d); the request's content is not logged."
            record.args = (original, type(error).__name__, error.code)
            record.exc_info = None
            record.exc_text = None
        return True


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """Return the `logging.config.dictConfig` mapping for the given format."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {
            "repeats": {"()": RepeatFilter, "interval_seconds": REPEAT_INTERVAL_S},
            "request_parse_errors": {"()": RequestParseErrorFilter},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["repeats"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
        # One line per HTTP request would drown the pipeline's own lines.
        "loggers": {
            "httpx": {"level": "WARNING"},
            "aiohttp.server": {"filters": ["request_parse_errors"]},
        },
    }
