import pytest

from autopull.streams.commands import CommandError, command_event, normalize_mailbox


def test_normalize_mailbox_strips_and_lowers():
    assert normalize_mailbox("  Bob@Example.COM ") == "bob@example.com"


def test_normalize_mailbox_keeps_none():
    assert normalize_mailbox(None) is None


@pytest.mark.parametrize("blank", ["", " ", "\t\n "])
def test_normalize_mailbox_rejects_blank(blank):
    with pytest.raises(CommandError, match="The mailbox is blank"):
        normalize_mailbox(blank)


@pytest.mark.parametrize(
    "value", ["bob", "@example.com", "bob@", "bob smith@example.com", "bob@ex ample"]
)
def test_normalize_mailbox_rejects_non_address(value):
    with pytest.raises(CommandError, match="is not an email address") as raised:
        normalize_mailbox(value)
    assert repr(value) in str(raised.value)


def test_command_event_rejects_blank_mailbox():
    with pytest.raises(CommandError, match="blank"):
        command_event("INC-1", "release", "carol", mailbox="   ")


def test_command_event_normalizes_mailbox():
    event = command_event("INC-1", "release", "carol", mailbox=" BOB@example.com")
    assert event["command"]["mailbox"] == "bob@example.com"


def test_command_event_without_mailbox_means_all():
    event = command_event("INC-1", "release", "carol")
    assert event["command"]["mailbox"] is None


def test_cli_release_rejects_blank_mailbox(tmp_path):
    import io

    from autopull.streams.operate import run_command
    from autopull.streams.settings import Settings

    # The mailbox is checked before Kafka is reached, so no broker listens here.
    settings = Settings(kafka_bootstrap="127.0.0.1:9", data_dir=tmp_path)
    out = io.StringIO()
    code = run_command(settings, "INC-1", "release", mailbox="   ", out=out)
    assert code == 2
    assert out.getvalue().startswith("error: The mailbox is blank.")
