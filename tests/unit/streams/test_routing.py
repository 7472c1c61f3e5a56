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


def test_gmail_domain_routes_to_gmail(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from autopull.connectors.mail.gmail import GmailPlatform
    from autopull.streams.routing import build_router

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    gmail = {
        "service_account_email": "svc@p.iam.gserviceaccount.com",
        "client_id": "1045",
        "private_key": pem,
        "quarantine_mailbox": "q@example.org",
    }
    settings = Settings(
        graph=GRAPH,
        gmail=gmail,
        routing={"example.com": "graph", "example.org": "gmail"},
    )
    platforms: dict = {}

    route = build_router(settings, platforms)

    assert platform_name(settings, "dana@example.org") == "gmail"
    assert isinstance(route("dana@example.org"), GmailPlatform)
    assert route("erik@example.org") is platforms["gmail"]
    assert platform_name(settings, "alice@example.com") == "graph"


def test_routing_warning_for_one_platform_without_table():
    from autopull.streams.routing import routing_warning

    settings = Settings(graph=GRAPH)
    warning = routing_warning(settings)
    assert warning is not None
    assert "every address is taken to be a mailbox on graph" in warning
    assert '{"example.com": "graph"}' in warning
    routed = Settings(graph=GRAPH, routing={"example.com": "graph"})
    assert routing_warning(routed) is None
