"""Log configuration of the worker and the CLI: plain text or one JSON object a line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s %(message)s"


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


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """Return the `logging.config.dictConfig` mapping for the given format."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
        # One line per HTTP request would drown the pipeline's own lines.
        "loggers": {"httpx": {"level": "WARNING"}},
    }
