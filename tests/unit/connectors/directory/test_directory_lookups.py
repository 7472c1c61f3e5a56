"""Resolution and expansion walks on ldap3's in-memory mock directory."""

from __future__ import annotations

import logging

import pytest
from directory_fakes import (
    BASE,
    MockDirectory,
    group,
    group_dn,
    openldap_settings,
    people_dn,
    person,
)

from autopull.connectors.directory import DirectorySettings
from autopull.connectors.directory.lookups import (
    collect_groups,
    expand_address,
    find_person,
)

LOOKUPS_LOGGER = "autopull.connectors.directory.lookups"


def test_find_person_alias_returns_primary(corp: MockDirectory) -> None:
    settings = openldap_settings()

    found = find_person(corp.session(settings), settings, "alice@corp.test")

    assert found is not None
    assert found.mailbox == "alice.archer@corp.test"
    assert found.addresses == ("alice.archer@corp.test", "alice@corp.test")
    assert found.display_name == "Alice Archer"
    assert found.title == "Chief Financial Officer"
    assert found.department == "Finance"
    assert found.manager == people_dn("carol")


def test_find_person_unknown_returns_none(corp: MockDirectory) -> None:
    settings = openldap_settings()

    assert find_person(corp.session(settings), settings, "nobody@corp.test") is None


def test_find_person_list_address_returns_none(corp: MockDirectory) -> None:
    settings = openldap_settings()

    assert find_person(corp.session(settings), settings, "staff@corp.test") is None


def test_find_person_nested_vip(corp: MockDirectory) -> None:
    settings = openldap_settings(vip_groups=(group_dn("VIP").upper(),))
    session = corp.session(settings)

    alice = find_person(session, settings, "alice@corp.test")
    carol = find_person(session, settings, "carol@corp.test")
    dave = find_person(session, settings, "dave@corp.test")

    assert alice is not None and alice.vip is True
    assert carol is not None and carol.vip is True
    assert dave is not None and dave.vip is False


def test_find_person_without_vip_groups_is_not_vip(corp: MockDirectory) -> None:
    settings = openldap_settings()

    carol = find_person(corp.session(settings), settings, "carol@corp.test")

    assert carol is not None
    assert carol.vip is False


def test_collect_groups_follows_cycle_once(corp: MockDirectory) -> None:
    settings = openldap_settings()

    groups = collect_groups(corp.session(settings), settings, people_dn("bob"))

    assert sorted(groups) == sorted(
        [group_dn("staff"), group_dn("loop-b"), group_dn("loop-a")]
    )


def test_collect_groups_depth_limit_warns(
    corp: MockDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = openldap_settings(max_nesting_depth=1)

    groups = collect_groups(corp.session(settings), settings, people_dn("alice"))

    assert groups == (group_dn("executives"),)
    assert "max_nesting_depth=1" in caplog.text


def test_find_person_duplicate_address_prefers_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = MockDirectory()
    directory.add(people_dn("a"), person("a", "SMTP:a@corp.test", "smtp:x@corp.test"))
    directory.add(people_dn("x"), person("x", "SMTP:x@corp.test"))
    settings = openldap_settings()

    found = find_person(directory.session(settings), settings, "x@corp.test")

    assert found is not None
    assert found.dn == people_dn("x")
    assert "held by 2 directory entries" in caplog.text


def test_expand_nested_list_each_mailbox_once(corp: MockDirectory) -> None:
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "staff@corp.test")

    assert expansion.kind == "list"
    assert sorted(expansion.mailboxes) == [
        "alice.archer@corp.test",
        "bob@corp.test",
        "carol@corp.test",
        "dave@corp.test",
    ]


def test_expand_paths_follow_lists(corp: MockDirectory) -> None:
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "staff@corp.test")
    paths = {member.mailbox: member.path for member in expansion.members}

    assert paths["bob@corp.test"] == ("staff@corp.test", "bob@corp.test")
    assert paths["alice.archer@corp.test"] == (
        "staff@corp.test",
        "executives@corp.test",
        "alice.archer@corp.test",
    )
    assert paths["carol@corp.test"] == (
        "staff@corp.test",
        "loop-a@corp.test",
        "carol@corp.test",
    )


def test_expand_unresolved_members_listed(corp: MockDirectory) -> None:
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "staff@corp.test")

    assert expansion.unresolved == (people_dn("frank"), people_dn("ghost"))


def test_expand_cycle_terminates(
    corp: MockDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = openldap_settings()
    caplog.set_level(logging.WARNING, logger=LOOKUPS_LOGGER)

    expansion = expand_address(corp.session(settings), settings, "loop-b@corp.test")

    assert expansion.mailboxes == ("bob@corp.test", "carol@corp.test")
    assert expansion.members[1].path == (
        "loop-b@corp.test",
        "loop-a@corp.test",
        "carol@corp.test",
    )
    assert caplog.records == []


def test_expand_group_without_mail_uses_dn_in_path(corp: MockDirectory) -> None:
    corp.add(group_dn("outer"), group("outer", group_dn("vip"), mail="outer@corp.test"))
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "outer@corp.test")
    paths = {member.mailbox: member.path for member in expansion.members}

    assert paths["carol@corp.test"] == (
        "outer@corp.test",
        group_dn("vip"),
        "carol@corp.test",
    )


def _big_list(size: int) -> MockDirectory:
    directory = MockDirectory()
    members = [people_dn(f"user{number:02d}") for number in range(size)]
    for number in range(size):
        directory.add(people_dn(f"user{number:02d}"), person(f"user{number:02d}"))
    directory.add(group_dn("big"), group("big", *members, mail="big@corp.test"))
    return directory


@pytest.mark.parametrize(
    ("size", "limit", "too_large", "kept"),
    [
        (5, 5, False, 5),
        (6, 5, True, 5),
        (12, 3, True, 3),
        (12, 500, False, 12),
    ],
)
def test_expand_member_limit(size: int, limit: int, too_large: bool, kept: int) -> None:
    directory = _big_list(size)
    settings = openldap_settings(max_list_members=limit)

    expansion = expand_address(directory.session(settings), settings, "big@corp.test")

    assert expansion.too_large is too_large
    assert len(expansion.members) == kept


def test_expand_depth_limit_warns(
    corp: MockDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = openldap_settings(max_nesting_depth=1)

    expansion = expand_address(corp.session(settings), settings, "staff@corp.test")

    assert sorted(expansion.mailboxes) == ["bob@corp.test", "dave@corp.test"]
    assert "max_nesting_depth=1" in caplog.text


def test_expand_person_alias(corp: MockDirectory) -> None:
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "robert@corp.test")

    assert expansion.kind == "person"
    assert expansion.members[0].path == ("robert@corp.test", "bob@corp.test")


def test_expand_person_primary_path_has_one_step(corp: MockDirectory) -> None:
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "bob@corp.test")

    assert expansion.members[0].path == ("bob@corp.test",)


def test_expand_unknown_address(corp: MockDirectory) -> None:
    settings = openldap_settings()

    expansion = expand_address(corp.session(settings), settings, "x@corp.test")

    assert expansion.kind == "unknown"
    assert expansion.members == ()


def _active_directory() -> tuple[MockDirectory, DirectorySettings]:
    directory = MockDirectory(entry_dn_attribute="distinguishedName")
    user = {"objectClass": ["user"], "objectCategory": "person"}
    directory.add(
        f"cn=Ann,{BASE}",
        {**user, "proxyAddresses": ["SMTP:ann@corp.test"], "department": "Legal"},
    )
    directory.add(f"cn=Ben,{BASE}", {**user, "proxyAddresses": ["SMTP:ben@corp.test"]})
    # A contact is neither a user nor a group, so a list does not reach it.
    directory.add(
        f"cn=Partner,{BASE}", {"objectClass": ["contact"], "mail": "p@partner.test"}
    )
    directory.add(
        f"cn=Legal,{BASE}",
        {
            "objectClass": ["group"],
            "proxyAddresses": ["SMTP:legal@corp.test"],
            "member": [f"cn=Ann,{BASE}", f"cn=Ben,{BASE}", f"cn=Partner,{BASE}"],
        },
    )
    settings = DirectorySettings(
        url="ldaps://dc1.corp.test",
        bind_dn=f"cn=reader,{BASE}",
        password="reader-secret",
        base_dn=BASE,
        vip_groups=(f"cn=Legal,{BASE}",),
    )
    return directory, settings


def test_active_directory_flavor_resolves_and_expands() -> None:
    directory, settings = _active_directory()
    session = directory.session(settings)

    ann = find_person(session, settings, "ann@corp.test")
    expansion = expand_address(session, settings, "legal@corp.test")

    assert ann is not None
    assert ann.department == "Legal"
    assert ann.vip is True
    assert expansion.mailboxes == ("ann@corp.test", "ben@corp.test")
    assert expansion.unresolved == (f"cn=Partner,{BASE}",)
