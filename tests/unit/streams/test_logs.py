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


def repeat_record(created, message="Unable connect to node with id %s", level=None):
    args = (1,) if "%s" in message else ()
    entry = logging.LogRecord(
        "aiokafka", level or logging.ERROR, __file__, 1, message, args, None
    )
    entry.created = created
    return entry


def test_repeat_filter_drops_repeats_within_interval():
    from autopull.streams.logs import RepeatFilter

    repeats = RepeatFilter(interval_seconds=60)
    passed = [repeats.filter(repeat_record(1000 + i * 0.01)) for i in range(500)]
    assert passed[0] is True
    assert passed.count(True) == 1


def test_repeat_filter_counts_dropped_after_interval():
    from autopull.streams.logs import RepeatFilter

    repeats = RepeatFilter(interval_seconds=60)
    assert repeats.filter(repeat_record(1000.0))
    for i in range(1, 100):
        assert not repeats.filter(repeat_record(1000.0 + i * 0.5))
    summary = repeat_record(1061.0)
    assert repeats.filter(summary)
    assert summary.getMessage() == (
        "Unable connect to node with id 1 (repeated 99 more times in the last 61 s)"
    )
    assert not repeats.filter(repeat_record(1062.0))


def test_repeat_filter_keeps_distinct_and_info_records():
    from autopull.streams.logs import RepeatFilter

    repeats = RepeatFilter(interval_seconds=60)
    assert repeats.filter(repeat_record(1000.0, "Pull failed mailbox=a"))
    assert repeats.filter(repeat_record(1000.1, "Pull failed mailbox=b"))
    for i in range(10):
        info = repeat_record(1000.0 + i, "Accepted alert", level=logging.INFO)
        assert repeats.filter(info)


def test_repeat_filter_forgets_oldest_keys():
    from autopull.streams.logs import RepeatFilter

    repeats = RepeatFilter(interval_seconds=60, max_keys=2)
    for name in ("a", "b", "c"):
        assert repeats.filter(repeat_record(1000.0, f"failed {name}"))
    assert repeats.filter(repeat_record(1001.0, "failed a"))
    assert not repeats.filter(repeat_record(1001.0, "failed c"))


def test_configured_logging_limits_library_flood(capsys):
    import logging.config

    logging.config.dictConfig(logging_config("INFO", "text"))
    library = logging.getLogger("aiokafka")
    try:
        raise ConnectionRefusedError(111, "Connect call failed")
    except ConnectionRefusedError:
        for _ in range(1000):
            library.exception("Unable connect to node with id %s", 1)
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if "[ERROR] aiokafka" in line]
    assert len(errors) == 1
    assert "ConnectionRefusedError: [Errno 111] Connect call failed" in lines


async def test_unparsable_request_log_omits_header(capsys):
    import asyncio
    import logging.config

    from aiohttp import web

    logging.config.dictConfig(logging_config("INFO", "text"))
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    secret = "s3cr3t-api-key-0123456789"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = f"Authorization: Bearer {secret}{'x' * 9000}"
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        writer.close()
    finally:
        await runner.cleanup()

    assert status.split()[1] == b"400"
    err = capsys.readouterr().err
    assert secret not in err
    assert "Error handling request from 127.0.0.1: LineTooLong (status 400)" in err
