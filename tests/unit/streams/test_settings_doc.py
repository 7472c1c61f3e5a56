from pathlib import Path

from autopull.streams.settings import Settings
from autopull.streams.settings_doc import render, rows

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_configuration_doc_is_current():
    assert DOC.read_text() == render(), (
        "docs/configuration.md is out of date; regenerate it with "
        "python -m autopull.streams.settings_doc > docs/configuration.md"
    )


def test_every_field_is_documented():
    keys = {row[0] for row in rows(Settings)}
    assert "graph.client_secret" in keys
    assert "policy.quarantine_mailbox" in keys
    assert all(row[3] or "." in row[0] for row in rows(Settings))
