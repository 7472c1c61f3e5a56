"""The `ingest` and `plan` commands: format names, unusable inputs, sizes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from autopull.connectors.sources.detect import format_names
from autopull.streams.cli import main
from autopull.streams.ingest import IngestError, read_input, run_ingest
from autopull.streams.plan import run_plan
from autopull.streams.policy import PolicySettings
from autopull.streams.settings import Settings

SETTINGS = PolicySettings(quarantine_mailbox="quarantine@example.com")


@pytest.mark.parametrize("command", ["ingest", "plan"])
def test_help_lists_every_format(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])

    out = capsys.readouterr().out
    for name in format_names():
        assert name in out


@pytest.mark.parametrize("command", ["ingest", "plan"])
def test_unknown_source_rejected_before_reading(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.json"
    path.write_text("{}")

    with pytest.raises(SystemExit) as caught:
        main([command, "--source", "bogus", str(path)])

    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "'bogus'" in captured.err
    assert "'fireeye'" in captured.err


def test_run_ingest_unknown_source_exit_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.json"
    path.write_text("{}")
    # The name is rejected before a producer is made, so no broker is needed.
    settings = Settings(kafka_bootstrap="127.0.0.1:9")

    code = run_ingest([str(path)], settings, "bogus")

    assert code == 2
    err = capsys.readouterr().err
    assert "The alert format 'bogus' is unknown" in err
    assert "tap, fireeye, generic" in err


def test_read_input_directory_says_directory(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as caught:
        read_input(str(tmp_path), 1024)

    assert "is a directory" in str(caught.value)
    assert "not found" not in str(caught.value)


def test_read_input_missing_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as caught:
        read_input(str(tmp_path / "missing.json"), 1024)

    assert "was not found" in str(caught.value)


def test_read_input_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_bytes(b"")

    with pytest.raises(IngestError) as caught:
        read_input(str(path), 1024)

    assert str(caught.value) == f"{path}: the input is empty. Send one alert."


def test_read_input_empty_stdin_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))

    with pytest.raises(IngestError) as caught:
        read_input("-", 1024)

    assert str(caught.value) == "<stdin>: the input is empty. Send one alert."


def test_read_input_size_has_separators(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * 1_200_177)

    with pytest.raises(IngestError) as caught:
        read_input(str(path), 1_048_576)

    assert "1,200,177 bytes" in str(caught.value)
    assert "ingest limit of 1,048,576 bytes" in str(caught.value)


def test_plan_and_ingest_same_size_format(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * 1_200_177)
    out, err = io.StringIO(), io.StringIO()

    run_plan([str(path)], False, None, SETTINGS, stdout=out, stderr=err)
    with pytest.raises(IngestError) as caught:
        read_input(str(path), 1_048_576)

    assert "1,200,177 bytes" in err.getvalue()
    assert "1,200,177 bytes" in str(caught.value)


def test_plan_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    out, err = io.StringIO(), io.StringIO()

    code = run_plan([str(path)], False, None, SETTINGS, stdout=out, stderr=err)

    assert code == 1
    assert f"error: {path}: The input is empty. Send one alert." in err.getvalue()


def test_plan_errors_only_prints_no_table(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    out, err = io.StringIO(), io.StringIO()

    code = run_plan([str(path)], False, None, SETTINGS, stdout=out, stderr=err)

    assert code == 1
    assert out.getvalue() == ""
    assert "broken.json" in err.getvalue()


@pytest.mark.parametrize("timeout", ["-5", "0", "nan", "soon"])
def test_cli_rejects_timeout_not_above_zero(timeout, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["approve", "INC-1", "--wait", "--timeout", timeout])
    assert raised.value.code == 2
    assert f"argument --timeout: {timeout!r}" in capsys.readouterr().err


def test_ingest_missing_file_names_next_step(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(IngestError) as raised:
        read_input(str(missing), 1024)
    assert str(raised.value) == (
        f"{missing}: the file was not found. Check the path and its permissions."
    )
