"""Each example alert plans to exactly the decisions in its .expected.jsonl file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autopull.streams.plan import run_plan
from autopull.streams.policy import PolicySettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "alerts"
ALERT_FILES = sorted([*EXAMPLES.glob("*.json"), *EXAMPLES.glob("*.xml")])
DEMO_SETTINGS = PolicySettings(quarantine_mailbox="quarantine@example.com")


def test_examples_folder_has_alerts() -> None:
    assert len(ALERT_FILES) >= 4


@pytest.mark.parametrize("alert_file", ALERT_FILES, ids=lambda path: path.name)
def test_example_plan_matches_expected(alert_file: Path) -> None:
    expected_file = alert_file.with_name(alert_file.stem + ".expected.jsonl")
    out, err = io.StringIO(), io.StringIO()

    code = run_plan(
        [str(alert_file)], True, None, DEMO_SETTINGS, stdout=out, stderr=err
    )

    assert err.getvalue() == ""
    assert code == 0
    assert out.getvalue().splitlines() == expected_file.read_text().splitlines()


@pytest.mark.parametrize(
    "expected_file",
    sorted(EXAMPLES.glob("*.expected.jsonl")),
    ids=lambda path: path.name,
)
def test_expected_file_has_alert(expected_file: Path) -> None:
    stem = expected_file.name.removesuffix(".expected.jsonl")

    assert (EXAMPLES / f"{stem}.json").is_file() or (EXAMPLES / f"{stem}.xml").is_file()


def test_plan_command_prints_expected_lines() -> None:
    # One process for every file, because starting the command takes seconds. The
    # lines of each file follow one another, in the order of the arguments.
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("AUTOPULL_")
    }
    expected = [
        line
        for alert_file in ALERT_FILES
        for line in alert_file.with_name(alert_file.stem + ".expected.jsonl")
        .read_text()
        .splitlines()
    ]

    result = subprocess.run(
        [sys.executable, "-m", "autopull.streams.cli", "plan", "--json"]
        + [str(path) for path in ALERT_FILES],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.stderr == ""
    assert result.returncode == 0
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize(
    "event_class",
    ["message_delivered", "message_blocked", "click_permitted", "click_blocked"],
)
def test_examples_one_tap_file_per_event_class(event_class: str) -> None:
    single_class_files = []
    for alert_file in sorted(EXAMPLES.glob("tap-*.json")):
        expected = alert_file.with_name(alert_file.stem + ".expected.jsonl")
        classes = {json.loads(line)["event_class"] for line in expected.open()}
        if classes == {event_class}:
            single_class_files.append(alert_file.name)

    assert single_class_files
