"""Each example alert plans to exactly the decisions in its .expected.jsonl file."""

from __future__ import annotations

import io
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
