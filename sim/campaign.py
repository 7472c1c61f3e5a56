"""Scenarios of one phishing campaign that reached many Microsoft 365 mailboxes.

Benchmarks and burst tests build worlds of thousands of mailboxes from here instead
of shipping large scenario files: each user mailbox gets one copy of the campaign
message in its inbox, and the tenant has a central quarantine mailbox.
"""

from __future__ import annotations

from typing import Any

CAMPAIGN_DOMAIN = "burst.example.com"
CAMPAIGN_MESSAGE_ID = "campaign-0001@invoices.example.net"
TENANT_ID = "0f5f3c1e-6c1d-4b7a-9d2e-3a8b5c7d9e01"
CLIENT_ID = "7c2d9e4f-1a3b-4c5d-8e6f-0a1b2c3d4e5f"
# A credential of the simulated tenant only, never of a real one.
CLIENT_SECRET = "burst-client-secret-for-the-simulator"  # noqa: S105
QUARANTINE_MAILBOX = f"quarantine@{CAMPAIGN_DOMAIN}"


def user_mailbox(index: int) -> str:
    """Return the address of the `index`-th user mailbox of the campaign."""
    return f"user{index:05d}@{CAMPAIGN_DOMAIN}"


def campaign_scenario(mailboxes: int) -> dict[str, Any]:
    """Return a scenario: `mailboxes` users with one inbox copy each, one tenant."""
    users = [user_mailbox(index) for index in range(mailboxes)]
    return {
        "name": f"campaign-{mailboxes}",
        "tenants": [
            {
                "domain": CAMPAIGN_DOMAIN,
                "platform": "graph",
                "tenant_id": TENANT_ID,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "permissions": ["Mail.ReadWrite"],
            }
        ],
        "mailboxes": [{"address": QUARANTINE_MAILBOX}]
        + [{"address": user} for user in users],
        "messages": [
            {
                "key": "CAMPAIGN",
                "message_id": f"<{CAMPAIGN_MESSAGE_ID}>",
                "from": "Billing <billing@invoices.example.net>",
                "to": users[:1],
                "subject": "Invoice overdue",
                "date": "2026-12-01T08:00:00Z",
                "body": "Pay now: http://invoices.example.net/pay\n",
                "malicious": True,
                "deliveries": [{"mailbox": user} for user in users],
            }
        ],
    }
