import pytest

from autopull.streams.routing import platform_name
from autopull.streams.settings import Settings

GRAPH = {
    "tenant_id": "t",
    "client_id": "c",
    "client_secret": "s",
    "quarantine_mailbox": "q@example.com",
}
EWS = {
    "service_endpoint": "http://127.0.0.1:1/EWS/Exchange.asmx",
    "username": "svc",
    "password": "pw",
    "quarantine_mailbox": "q@corp.example.com",
}


def test_single_platform_serves_every_mailbox():
    settings = Settings(graph=GRAPH)
    assert platform_name(settings, "alice@example.com") == "graph"
    assert platform_name(settings, "someone@elsewhere.net") == "graph"


def test_no_platform_routes_nowhere():
    assert platform_name(Settings(), "alice@example.com") is None


@pytest.mark.parametrize(
    ("mailbox", "platform"),
    [
        ("alice@example.com", "graph"),
        ("Bob@Corp.Example.com", "ews"),
        ("carol@eu.corp.example.com", "ews"),
        ("ceo@corp.example.com", "graph"),
        ("mallory@unknown.net", None),
    ],
)
def test_routing_table_address_wins_over_domain(mailbox, platform):
    settings = Settings(
        graph=GRAPH,
        ews=EWS,
        routing={
            "example.com": "graph",
            "corp.example.com": "ews",
            "CEO@corp.example.com": "graph",
        },
    )
    assert platform_name(settings, mailbox) == platform
