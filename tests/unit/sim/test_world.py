"""The mail world: scenario loading, MIME building, ids, state files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from autopull.sim.world import (
    FolderExistsError,
    ItemNotFoundError,
    ScenarioError,
    World,
    load_scenario,
    summarize_mime,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO = REPO_ROOT / "examples" / "worlds" / "demo.json"
M1_ID = "<20261201093000.1234.invoice@billing-example.net>"
M2_ID = "<CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net>"
NOW = datetime(2026, 12, 2, tzinfo=UTC)


def small_scenario(**changes: Any) -> dict[str, Any]:
    scenario: dict[str, Any] = {
        "tenants": [{"domain": "example.com", "platform": "graph"}],
        "mailboxes": [
            {
                "address": "alice@example.com",
                "folders": [{"name": "Projects"}, {"name": "Sub", "parent": "inbox"}],
            }
        ],
        "messages": [
            {
                "key": "K1",
                "message_id": "<k1@example.net>",
                "from": "Sender <sender@example.net>",
                "to": ["alice@example.com"],
                "subject": "Hello",
                "date": "2026-12-01T08:00:00Z",
                "body": "Body text http://example.net/x\n",
                "deliveries": [
                    {"mailbox": "alice@example.com", "folder": "inbox"},
                    {
                        "mailbox": "alice@example.com",
                        "folder": "inbox/Sub",
                        "read": True,
                    },
                ],
            }
        ],
    }
    scenario.update(changes)
    return scenario


def rows_for(world: World, address: str, key: str) -> list[dict[str, Any]]:
    return [row for row in world.snapshot(address) if row["key"] == key]


# --- the demo world -------------------------------------------------------------------


def test_demo_m1_delivered_to_three_folders() -> None:
    world = World.open(DEMO, None)

    alice, bob, carol = (
        rows_for(world, f"{name}@example.com", "M1")
        for name in ("alice", "bob", "carol")
    )

    assert [(r["folder"], r["is_read"]) for r in alice] == [("Inbox", False)]
    assert [(r["folder"], r["is_read"]) for r in bob] == [("Inbox", True)]
    assert [(r["folder"], r["is_read"]) for r in carol] == [("Projects", False)]
    assert alice[0]["internet_message_id"] == M1_ID


def test_demo_m2_in_dave_inbox_and_junk() -> None:
    world = World.open(DEMO, None)

    copies = rows_for(world, "dave@example.com", "M2")

    assert sorted(r["well_known_folder"] for r in copies) == ["inbox", "junkemail"]
    assert {r["internet_message_id"] for r in copies} == {M2_ID}
    assert all(not r["is_read"] for r in copies)


def test_demo_m2_mime_keeps_reserved_characters() -> None:
    world = World.open(DEMO, None)
    item_id = rows_for(world, "dave@example.com", "M2")[0]["id"]

    mime = world.items[item_id].mime
    parsed = message_from_bytes(mime, policy=compat32)

    assert f"Message-ID: {M2_ID}\r\n".encode() in mime
    assert parsed["From"] == "scanner@mail.example.net"
    assert parsed["Subject"] == "Scanned document"
    assert [part.get_filename() for part in parsed.walk() if part.get_filename()] == [
        "scan_0412.pdf"
    ]


def test_demo_m4_only_in_frank_inbox() -> None:
    world = World.open(DEMO, None)
    m4 = world.catalog["M4"]
    frank = [r for r in world.snapshot("frank@example.com") if r["key"] == "M4"]

    assert m4.malicious is True
    assert [r["folder"] for r in frank] == ["Inbox"]
    assert sum(item.key == "M4" for item in world.items.values()) == 1


def test_demo_m5_and_m6_reach_their_mailboxes() -> None:
    world = World.open(DEMO, None)

    folders = {
        (row["key"], address): row["folder"]
        for address in ("erin@example.com", "frank@example.com", "uma@example.com")
        for row in world.snapshot(address)
    }
    assert folders[("M5", "erin@example.com")] == "Inbox"
    assert folders[("M5", "frank@example.com")] == "Deleted Items"
    assert folders[("M6", "uma@example.com")] == "Inbox"


def test_demo_m3_spam_for_erin() -> None:
    world = World.open(DEMO, None)

    copies = rows_for(world, "erin@example.com", "M3")

    assert [r["internet_message_id"] for r in copies] == [
        "<spam-0001@promo.example.net>"
    ]
    assert copies[0]["verdict"] == "spam"


def test_demo_every_mailbox_has_three_benign_messages() -> None:
    world = World.open(DEMO, None)
    expected = {
        f"{name}@example.com"
        for name in (
            "alice",
            "bob",
            "carol",
            "dave",
            "erin",
            "frank",
            "uma",
            "tara",
            "quarantine",
        )
    }

    assert set(world.mailboxes) == expected
    for address in expected:
        benign = [r for r in world.snapshot(address) if r["verdict"] == "benign"]
        assert len(benign) >= 3, address
        assert len({r["internet_message_id"] for r in benign}) == len(benign), address


def test_demo_tenant_is_graph_with_credentials() -> None:
    scenario = load_scenario(DEMO)
    tenant = scenario.tenants[0]

    assert tenant.domain == "example.com"
    assert tenant.platform == "graph"
    assert tenant.tenant_id
    assert tenant.client_id
    assert tenant.client_secret


# --- building the world ---------------------------------------------------------------


def test_world_creates_well_known_folders() -> None:
    world = World.from_scenario(small_scenario())

    names = {f["well_known"] for f in world.folders_snapshot("alice@example.com")}

    assert {
        "inbox",
        "junkemail",
        "deleteditems",
        "sentitems",
        "drafts",
        "archive",
    } <= names
    assert "recoverableitemsdeletions" in names


def test_world_resolves_nested_folder_path() -> None:
    world = World.from_scenario(small_scenario())

    folder = world.resolve_folder_path("alice@example.com", "inbox/Sub")

    assert folder.display_name == "Sub"
    assert world.folder_path(folder) == "Inbox/Sub"


def test_world_item_ids_stable_across_loads() -> None:
    first = World.from_scenario(small_scenario())
    second = World.from_scenario(small_scenario())

    assert sorted(first.items) == sorted(second.items)
    assert len(first.items) == 2


def test_world_mailbox_lookup_ignores_case() -> None:
    world = World.from_scenario(small_scenario())

    assert world.mailbox("Alice@Example.COM").address == "alice@example.com"


def test_world_received_defaults_after_date_header() -> None:
    world = World.from_scenario(small_scenario())

    received = {item.received_at for item in world.items.values()}

    assert received == {datetime(2026, 12, 1, 8, 0, 5, tzinfo=UTC)}


def test_world_move_gives_new_id_and_drops_old() -> None:
    world = World.from_scenario(small_scenario())
    item = next(iter(world.items.values()))
    old_id = item.item_id
    junk = world.folder("alice@example.com", "junkemail")

    moved = world.move_item("alice@example.com", old_id, junk.folder_id, NOW)

    assert moved.item_id != old_id
    assert moved.folder_id == junk.folder_id
    with pytest.raises(ItemNotFoundError):
        world.item("alice@example.com", old_id)


def test_world_items_of_follows_moves_and_removals() -> None:
    scenario = small_scenario()
    scenario["mailboxes"].append({"address": "bob@example.com"})
    scenario["messages"][0]["deliveries"].append({"mailbox": "bob@example.com"})
    world = World.from_scenario(scenario)
    first, second = (item.item_id for item in world.items_of("alice@example.com"))
    junk = world.folder("alice@example.com", "junkemail")

    moved = world.move_item("alice@example.com", first, junk.folder_id, NOW)
    world.remove_item("alice@example.com", second)

    alice = [item.item_id for item in world.items_of("ALICE@example.com")]
    in_junk = [i.item_id for i in world.items_of("alice@example.com", junk.folder_id)]
    assert alice == [moved.item_id]
    assert in_junk == [moved.item_id]
    assert len(list(world.items_of("bob@example.com"))) == 1


def test_world_copy_keeps_original() -> None:
    world = World.from_scenario(small_scenario())
    item = next(iter(world.items.values()))
    archive = world.folder("alice@example.com", "archive")

    copy = world.copy_item("alice@example.com", item.item_id, archive.folder_id, NOW)

    assert copy.item_id != item.item_id
    assert world.item("alice@example.com", item.item_id).folder_id == item.folder_id
    assert copy.mime == item.mime


def test_world_duplicate_folder_name_raises() -> None:
    world = World.from_scenario(small_scenario())
    root = world.folder("alice@example.com", "msgfolderroot")

    with pytest.raises(FolderExistsError):
        world.create_folder("alice@example.com", root.folder_id, "projects")


def test_world_hidden_folder_created() -> None:
    world = World.from_scenario(small_scenario())
    root = world.folder("alice@example.com", "msgfolderroot")

    folder = world.create_folder("alice@example.com", root.folder_id, "Q", hidden=True)

    assert folder.hidden is True
    assert world.child_named("alice@example.com", root.folder_id, "q") is folder


# --- MIME -----------------------------------------------------------------------------


def test_raw_mime_folded_message_id_unfolded() -> None:
    raw = (
        "Message-ID:\r\n <PAXP193MB2314@PAXP193MB2314.eurprd01.mail.example.com>\r\n"
        "From: victor@example.com\r\nTo: uma@example.com\r\nSubject: Hi\r\n\r\nbody\r\n"
    )
    messages = [
        {"key": "R1", "raw": raw, "deliveries": [{"mailbox": "alice@example.com"}]}
    ]
    world = World.from_scenario(small_scenario(messages=messages))

    row = rows_for(world, "alice@example.com", "R1")[0]

    assert row["internet_message_id"] == (
        "<PAXP193MB2314@PAXP193MB2314.eurprd01.mail.example.com>"
    )


@pytest.mark.parametrize(
    "message_id",
    [
        "<[ABCDEF====@example.com]>",
        "<113c01d86b4a$53bb4230$fa9e45a$@appmanager@example.net>",
        "<00E19E93-513A-4A2B-964B-BB0372099DB6@@example.com>",
        "<2415681bce7c00293a83fce817e928a4>",
    ],
)
def test_summary_keeps_odd_message_ids_whole(message_id: str) -> None:
    mime = f"Message-ID: {message_id}\r\nSubject: x\r\n\r\nbody\r\n".encode()

    assert summarize_mime(mime).internet_message_id == message_id


def test_summary_decodes_split_encoded_words() -> None:
    mime = (
        b"Subject: =?UTF-8?Q?=C3=9Cberwei?=\r\n =?UTF-8?Q?sung_best=C3=A4?=\r\n"
        b" =?UTF-8?Q?tigt?=\r\n\r\nbody\r\n"
    )

    assert summarize_mime(mime).subject == "Überweisung bestätigt"


def test_build_mime_non_ascii_subject_encoded() -> None:
    messages = [
        {
            "key": "U1",
            "message_id": "<u1@example.net>",
            "from": "a@example.net",
            "to": ["alice@example.com"],
            "subject": "Überweisung",
            "body": "Grüße",
            "deliveries": [{"mailbox": "alice@example.com"}],
        }
    ]
    world = World.from_scenario(small_scenario(messages=messages))
    item = next(iter(world.items.values()))

    assert item.mime.isascii()
    assert item.summary.subject == "Überweisung"
    assert item.summary.body == "Grüße"


def test_build_mime_header_line_break_rejected() -> None:
    message = small_scenario()["messages"][0]
    message["headers"] = {"X-Test": "a\r\nBcc: victim@example.com"}

    with pytest.raises(ScenarioError, match="line break"):
        World.from_scenario(small_scenario(messages=[message]))


# --- scenario errors ------------------------------------------------------------------


def test_scenario_unknown_field_named_in_error() -> None:
    scenario = small_scenario()
    scenario["mailboxes"][0]["colour"] = "blue"

    with pytest.raises(ScenarioError, match=r"mailboxes\.0\.colour"):
        World.from_scenario(scenario)


def test_scenario_delivery_to_unknown_mailbox_rejected() -> None:
    message = small_scenario()["messages"][0]
    message["deliveries"] = [{"mailbox": "zoe@example.com"}]

    with pytest.raises(ScenarioError, match=r"zoe@example\.com"):
        World.from_scenario(small_scenario(messages=[message]))


def test_scenario_mailbox_without_tenant_rejected() -> None:
    scenario = small_scenario(mailboxes=[{"address": "x@other.example"}], messages=[])

    with pytest.raises(ScenarioError, match="no tenant"):
        World.from_scenario(scenario)


def test_scenario_file_not_json_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")

    with pytest.raises(ScenarioError, match="could not be read"):
        load_scenario(path)


# --- state file -----------------------------------------------------------------------


def write_scenario(tmp_path: Path, scenario: dict[str, Any]) -> Path:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario), encoding="utf-8")
    return path


def test_open_writes_state_file_at_once(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, small_scenario())
    state = tmp_path / "state" / "world.json"

    World.open(scenario, state)

    data = json.loads(state.read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert len(data["items"]) == 2


def test_state_round_trip_keeps_changes(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, small_scenario())
    state = tmp_path / "world.json"
    world = World.open(scenario, state)
    item = next(iter(world.items.values()))
    junk = world.folder("alice@example.com", "junkemail")
    moved = world.move_item("alice@example.com", item.item_id, junk.folder_id, NOW)
    moved.is_read = True
    moved.extended_properties["String {guid} Name X"] = "v"
    world.save()

    again = World.open(scenario, state)

    restored = again.item("alice@example.com", moved.item_id)
    assert restored.folder_id == junk.folder_id
    assert restored.is_read is True
    assert restored.extended_properties == {"String {guid} Name X": "v"}
    assert restored.mime == moved.mime


def test_state_ids_keep_counting_after_reload(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, small_scenario())
    state = tmp_path / "world.json"
    world = World.open(scenario, state)
    junk = world.folder("alice@example.com", "junkemail")
    first_id, other_id = list(world.items)
    moved_id = world.move_item(
        "alice@example.com", first_id, junk.folder_id, NOW
    ).item_id
    world.save()

    again = World.open(scenario, state)
    moved_again = again.move_item("alice@example.com", other_id, junk.folder_id, NOW)

    assert moved_again.item_id not in (moved_id, first_id, other_id)


def test_open_reset_starts_from_scenario(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, small_scenario())
    state = tmp_path / "world.json"
    world = World.open(scenario, state)
    item = next(iter(world.items.values()))
    world.remove_item("alice@example.com", item.item_id)
    world.save()

    kept = World.open(scenario, state)
    reset = World.open(scenario, state, reset=True)

    assert len(kept.items) == 1
    assert len(reset.items) == 2


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, small_scenario())
    state = tmp_path / "world.json"
    world = World.open(scenario, state)

    world.save()
    world.save()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenario.json", "world.json"]


def test_state_file_of_other_version_rejected(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, small_scenario())
    state = tmp_path / "world.json"
    state.write_text(json.dumps({"version": 99}), encoding="utf-8")

    with pytest.raises(ScenarioError, match="--reset"):
        World.open(scenario, state)
