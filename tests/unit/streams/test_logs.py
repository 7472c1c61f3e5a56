import json
import logging

from autopull.streams.logs import JsonFormatter, logging_config


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(
        "autopull.test", logging.WARNING, __file__, 1, message, args, None
    )


def test_json_formatter_writes_one_object():
    line = JsonFormatter().format(record("Pull failed incident_id=%s", "INC-1"))
    entry = json.loads(line)
    assert entry["message"] == "Pull failed incident_id=INC-1"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "autopull.test"
    assert "\n" not in line


def test_json_formatter_keeps_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord(
            "autopull.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(failed))
    assert "ValueError: boom" in entry["exception"]


def test_config_picks_formatter():
    assert logging_config("INFO", "json")["formatters"]["default"] == {
        "()": JsonFormatter
    }
    assert "format" in logging_config("INFO", "text")["formatters"]["default"]
    assert logging_config("DEBUG", "text")["loggers"]["httpx"]["level"] == "WARNING"
