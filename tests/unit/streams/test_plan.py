from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autopull.streams.plan import (
    DEFAULT_MAX_ALERT_BYTES,
    FileError,
    plan_files,
    run_plan,
)
from autopull.streams.policy import PolicySettings

SETTINGS = PolicySettings(quarantine_mailbox="quarantine@example.com")
M1_ID = "20261201093000.1234.invoice@billing-example.net"


def tap_message(event_id: str, recipients: list[str], **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "GUID": "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5",
        "id": event_id,
        "messageID": f"<{M1_ID}>",
        "messageTime": "2026-12-01T09:30:04.000Z",
        "recipient": recipients,
        "threatsInfoMap": [
            {"classification": "phish", "threatStatus": "active", "threatType": "url"}
        ],
    }
    event.update(changes)
    return event


def write_alert(path: Path, document: object) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def run(
    paths: list[str], json_output: bool = True, stdin: bytes = b"", **kwargs: Any
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_plan(
        paths,
        json_output,
        kwargs.pop("source", None),
        SETTINGS,
        stdout=out,
        stderr=err,
        stdin=io.BytesIO(stdin),
        **kwargs,
    )
    return code, out.getvalue(), err.getvalue()


def test_plan_files_order_is_file_event_recipient(tmp_path: Path) -> None:
    first = write_alert(
        tmp_path / "first.json",
        {
            "messagesDelivered": [
                tap_message("e1", ["carol@example.com", "alice@example.com"]),
                tap_message("e2", ["bob@example.com"], GUID="other-guid"),
            ]
        },
    )
    second = write_alert(
        tmp_path / "second.json", tap_message("e3", ["dave@example.com"])
    )

    decisions, errors = plan_files([first, second], SETTINGS)

    assert errors == []
    assert [(d.alert_id, d.mailbox) for d in decisions] == [
        ("tap:e1", "carol@example.com"),
        ("tap:e1", "alice@example.com"),
        ("tap:e2", "bob@example.com"),
        ("tap:e3", "dave@example.com"),
    ]


def generic_alert(recipients: list[str]) -> dict[str, Any]:
    return {
        "json_version": "2.0",
        "classification": "phish",
        "email": {"message_id": f"<{M1_ID}>", "recipient": recipients},
    }


def fireeye_alert(recipients: list[str]) -> dict[str, Any]:
    return {
        "alert": {
            "uuid": "b7f3c1d2-5e6a-4f8b-9c0d-1e2f3a4b5c6d",
            "action": "notified",
            "dst": {"smtp-to": recipients},
            "smtp-message": {"id": f"<{M1_ID}>"},
        }
    }


def tap_per_recipient(recipients: list[str]) -> dict[str, Any]:
    # One event per recipient, each with its own id and one GUID, as TAP may send.
    return {
        "messagesDelivered": [
            tap_message(f"e{index}", [recipient])
            for index, recipient in enumerate(recipients)
        ]
    }


def tap_per_recipient_without_id(recipients: list[str]) -> dict[str, Any]:
    events = tap_per_recipient(recipients)
    for event in events["messagesDelivered"]:
        del event["id"]
    return events


ALERT_SHAPES = {
    "generic": generic_alert,
    "fireeye": fireeye_alert,
    "tap-one-event": lambda recipients: tap_message("e1", recipients),
    "tap-event-per-recipient": tap_per_recipient,
    "tap-event-per-recipient-without-id": tap_per_recipient_without_id,
}


def mailboxes(count: int) -> list[str]:
    return [f"user{index}@example.com" for index in range(count)]


@pytest.mark.parametrize("shape", ALERT_SHAPES)
def test_plan_files_above_limit_holds_all(tmp_path: Path, shape: str) -> None:
    path = write_alert(tmp_path / "a.json", ALERT_SHAPES[shape](mailboxes(60)))

    decisions, errors = plan_files([path], SETTINGS)

    assert errors == []
    assert len(decisions) == 60
    assert {decision.action for decision in decisions} == {"hold"}
    assert {decision.rule for decision in decisions} == {"default.hold-large-campaign"}


@pytest.mark.parametrize("shape", ALERT_SHAPES)
def test_plan_files_at_limit_pulls_all(tmp_path: Path, shape: str) -> None:
    path = write_alert(tmp_path / "a.json", ALERT_SHAPES[shape](mailboxes(50)))

    decisions, errors = plan_files([path], SETTINGS)

    assert errors == []
    assert len(decisions) == 50
    assert {decision.action for decision in decisions} == {"pull"}


def test_run_plan_json_lines_have_all_keys(tmp_path: Path) -> None:
    path = write_alert(tmp_path / "a.json", tap_message("e1", ["alice@example.com"]))

    code, out, err = run([path])

    lines = out.splitlines()
    assert code == 0
    assert err == ""
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "mailbox": "alice@example.com",
        "message_id": M1_ID,
        "action": "pull",
        "reason": (
            "The message was delivered and classified phish, so this copy is pulled."
        ),
        "rule": "default.pull-malicious",
        "source": "tap",
        "alert_id": "tap:e1",
        "classification": "phish",
        "event_class": "message_delivered",
    }


def test_run_plan_missing_file_reports_and_continues(tmp_path: Path) -> None:
    good = write_alert(tmp_path / "good.json", tap_message("e1", ["alice@example.com"]))
    missing = str(tmp_path / "missing.json")

    code, out, err = run([missing, good])

    assert code == 1
    assert len(out.splitlines()) == 1
    assert f"error: {missing}: The file cannot be read" in err
    assert "No such file" in err


def test_run_plan_directory_reports_error(tmp_path: Path) -> None:
    code, out, err = run([str(tmp_path)])

    assert code == 1
    assert out == ""
    assert str(tmp_path) in err


def test_run_plan_not_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")

    code, _, err = run([str(path)])

    assert code == 1
    assert f"error: {path}: The alert body is not valid JSON" in err


def test_run_plan_invalid_alert_names_field(tmp_path: Path) -> None:
    path = write_alert(tmp_path / "bad.json", tap_message("e1", []))

    code, _, err = run([path])

    assert code == 1
    assert "bad.json" in err
    assert "recipient" in err


def test_run_plan_invalid_event_plans_others(tmp_path: Path) -> None:
    bad = tap_message("e1", ["alice@example.com\u2028Bcc: eve@example.net"])
    good = tap_message("e2", ["bob@example.com"])
    document = {"messagesDelivered": [bad, good]}
    path = write_alert(tmp_path / "two.json", document)

    code, out, err = run([path])

    assert code == 1
    assert [json.loads(line)["mailbox"] for line in out.splitlines()] == [
        "bob@example.com"
    ]
    assert "two.json" in err
    assert "messagesDelivered[0] (id 'e1'" in err


def test_run_plan_oversized_file_reports(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (DEFAULT_MAX_ALERT_BYTES + 1))

    code, out, err = run([str(path)])

    assert code == 1
    assert out == ""
    assert "1,048,577 bytes" in err
    assert "ingest limit of 1,048,576 bytes" in err


def test_run_plan_file_at_limit_is_read(tmp_path: Path) -> None:
    body = json.dumps(tap_message("e1", ["alice@example.com"])).encode()
    path = tmp_path / "exact.json"
    path.write_bytes(body + b" " * (DEFAULT_MAX_ALERT_BYTES - len(body)))

    code, out, _ = run([str(path)])

    assert code == 0
    assert len(out.splitlines()) == 1


def test_run_plan_stdin_dash_reads_input() -> None:
    body = json.dumps(tap_message("e1", ["alice@example.com"])).encode()

    code, out, _ = run(["-"], stdin=body)

    assert code == 0
    assert json.loads(out)["mailbox"] == "alice@example.com"


def test_run_plan_stdin_over_limit_reports(tmp_path: Path) -> None:
    code, _, err = run(["-"], stdin=b" " * 101, max_bytes=100)

    assert code == 1
    assert "error: <stdin>: The input is more than 100 bytes" in err


def test_run_plan_no_paths_exit_two() -> None:
    code, out, err = run([])

    assert code == 2
    assert out == ""
    assert "no alert files" in err


def test_run_plan_named_source_parses(tmp_path: Path) -> None:
    path = write_alert(tmp_path / "a.json", tap_message("e1", ["alice@example.com"]))

    code, out, _ = run([path], source="tap")

    assert code == 0
    assert len(out.splitlines()) == 1


def test_run_plan_unknown_source_reports(tmp_path: Path) -> None:
    path = write_alert(tmp_path / "a.json", tap_message("e1", ["alice@example.com"]))

    code, out, err = run([path], source="syslog")

    assert code == 2
    assert out == ""
    assert (
        "The alert format 'syslog' is unknown. Use one of: tap, fireeye, generic."
        in err
    )


def test_run_plan_unrecognized_format_reports(tmp_path: Path) -> None:
    path = write_alert(tmp_path / "other.json", {"event": {"id": 7}})

    code, _, err = run([path])

    assert code == 1
    assert "matches none of the known formats (tap, fireeye, generic)" in err


def test_run_plan_table_shows_decision(tmp_path: Path) -> None:
    path = write_alert(
        tmp_path / "a.json",
        tap_message(
            "e1", ["alice@example.com"], messageID="<[gw10].x@[gw13].example.com>"
        ),
    )

    code, out, _ = run([path], json_output=False)

    assert code == 0
    assert "alice@example.com" in out
    assert "pull" in out
    assert "[gw10]" in out


def test_file_error_str_names_path() -> None:
    assert (
        str(FileError("a.json", "The file is empty.")) == "a.json: The file is empty."
    )


def test_plan_module_imports_without_faust_or_settings() -> None:
    code = (
        "import sys, autopull.streams.plan; "
        "bad = [m for m in sys.modules if m == 'faust' or m.startswith('faust.') "
        "or m == 'autopull.streams.settings']; "
        "print(','.join(bad))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == ""


@pytest.mark.parametrize("paths", [["-"], ["-", "-"]])
def test_run_plan_empty_stdin_reports(paths: list[str]) -> None:
    code, _, err = run(paths, stdin=b"")

    assert code == 1
    assert err.count("error: <stdin>") == len(paths)
