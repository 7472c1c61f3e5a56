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


def test_command_event_keeps_bare_message_id():
    event = command_event(
        "INC-1", "approve", "carol", message_id=" <pick@example.net> "
    )
    assert event["command"]["message_id"] == "pick@example.net"


@pytest.mark.parametrize("action", ["reject", "release", "retry", "close"])
def test_command_event_rejects_message_id_off_approve(action):
    with pytest.raises(CommandError, match=f"so {action} does not take one"):
        command_event("INC-1", action, "carol", message_id="pick@example.net")


@pytest.mark.parametrize("value", ["", "  ", "<>"])
def test_command_event_rejects_blank_message_id(value):
    with pytest.raises(CommandError, match="The Message-ID is blank"):
        command_event("INC-1", "approve", "carol", message_id=value)


def test_command_event_rejects_message_id_with_line_break():
    with pytest.raises(CommandError, match="line break"):
        command_event("INC-1", "approve", "carol", message_id="a@b\r\nBcc: x@y")


def test_approve_pick_outside_candidates_is_rejected():
    from autopull.streams.commands import check_approve_pick

    incident = {
        "incident_id": "INC-1",
        "pulls": [
            {
                "mailbox": "alice@example.com",
                "message_id": "search-1@no-message-id",
                "status": "held",
                "candidates": [
                    {"message_id": "first@example.net"},
                    {"message_id": "second@example.net"},
                ],
            }
        ],
    }
    check_approve_pick(incident, None, "second@example.net")
    with pytest.raises(CommandError) as raised:
        check_approve_pick(incident, None, "other@example.net")
    message = str(raised.value)
    assert "Message-ID other@example.net" in message
    assert "first@example.net, second@example.net" in message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"text": "note \ud800"}, "The comment contains a lone UTF-16 surrogate"),
        ({"mailbox": "bob\udfff@example.com"}, "The mailbox contains"),
        ({"message_id": "a\ud800@example.net"}, "The Message-ID contains"),
    ],
)
def test_command_event_rejects_lone_surrogate(fields, named):
    action = "approve" if "message_id" in fields else "comment"
    with pytest.raises(CommandError, match=named):
        command_event("INC-1", action, "carol", **{"text": "x", **fields})


def incident_of(*entries):
    return {"incident_id": "INC-1", "pulls": list(entries)}


def pull(mailbox, status="held", message_id="m1@example.net", search=None):
    return {
        "mailbox": mailbox,
        "message_id": message_id,
        "status": status,
        "search": search,
        "candidates": [],
    }


def test_mailbox_outside_incident_is_rejected():
    from autopull.streams.commands import check_mailbox

    incident = incident_of(pull("alice@example.com"), pull("bob@example.com"))
    check_mailbox(incident, "bob@example.com")
    check_mailbox(incident, None)
    with pytest.raises(CommandError) as raised:
        check_mailbox(incident, "zed@example.com")
    message = str(raised.value)
    assert "The mailbox zed@example.com has no copy in incident INC-1" in message
    assert "alice@example.com, bob@example.com" in message


def test_approve_without_message_id_to_pull_is_rejected():
    from autopull.streams.commands import check_approve_pick

    incident = incident_of(pull("alice@example.com", message_id=""))
    with pytest.raises(CommandError, match="have no Message-ID"):
        check_approve_pick(incident, None, None)


def test_approve_searchable_hold_is_accepted():
    from autopull.streams.commands import check_approve_pick

    search = {"senders": ["billing@example.net"], "subject": "Invoice"}
    searched = pull("alice@example.com", message_id="search-1@no-message-id")
    incident = incident_of(
        pull("bob@example.com", message_id=""), dict(searched, search=search)
    )
    check_approve_pick(incident, None, None)


def test_approve_with_nothing_held_is_rejected():
    from autopull.streams.commands import check_approve_pick

    incident = incident_of(pull("alice@example.com", status="quarantined"))
    with pytest.raises(CommandError, match="has no held copy, so there is nothing"):
        check_approve_pick(incident, None, None)


def test_approve_search_without_message_ids_is_rejected():
    from autopull.streams.commands import check_approve_pick

    search = {"senders": ["billing@example.net"], "subject": "Invoice"}
    entry = dict(
        pull("wendy@example.com", message_id="search-1@no-message-id"),
        search=search,
        candidates=[{"message_id": ""}, {"message_id": ""}],
    )
    with pytest.raises(CommandError, match="no Message-ID to pull them by"):
        check_approve_pick(incident_of(entry), None, None)
    with pytest.raises(CommandError, match="no Message-ID to pull them by"):
        check_approve_pick(incident_of(entry), None, "search-1@no-message-id")


def test_reject_with_nothing_held_is_rejected():
    from autopull.streams.commands import check_reject

    held = pull("bob@example.com", status="held")
    incident = incident_of(pull("alice@example.com", status="quarantined"), held)
    check_reject(incident, None)
    check_reject(incident, "bob@example.com")
    with pytest.raises(CommandError, match=r"no held copy in alice@example\.com"):
        check_reject(incident, "alice@example.com")
    done = incident_of(pull("alice@example.com", status="quarantined"))
    with pytest.raises(CommandError, match="nothing to reject"):
        check_reject(done, None)


def test_retry_with_nothing_failed_is_rejected():
    from autopull.streams.commands import check_retry

    failed = dict(pull("bob@example.com", status="failed"), action="pull")
    incident = incident_of(pull("alice@example.com", status="quarantined"), failed)
    check_retry(incident, None)
    check_retry(incident, "bob@example.com")
    with pytest.raises(CommandError, match=r"in alice@example\.com of incident INC-1"):
        check_retry(incident, "alice@example.com")
