import pytest
from pydantic import ValidationError

from autopull.streams.settings import Settings

SECRET = "super-secret-value-123456789"


def test_validation_error_hides_graph_secret(monkeypatch):
    monkeypatch.setenv("AUTOPULL_GRAPH__CLIENT_SECRET", SECRET)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "tenant_id" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET[:6] not in str(caught.value)


@pytest.mark.parametrize(
    "section",
    [
        {"ews": {"password": SECRET, "service_endpoint": 5}},
        {"imap": {"master_password": SECRET}},
        {"tap": {"secret": SECRET, "enabled": "maybe"}},
        {"webhook": {"tokens": {"": SECRET}}},
    ],
)
def test_validation_errors_hide_every_secret(section):
    with pytest.raises(ValidationError) as caught:
        Settings(**section)
    assert SECRET not in str(caught.value)


def test_secrets_are_masked_in_repr():
    settings = Settings(
        graph={
            "tenant_id": "t",
            "client_id": "c",
            "client_secret": SECRET,
            "quarantine_mailbox": "q@example.com",
        }
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())
