"""Generated mail worlds for forward tracing, each with its ground truth.

`generate(seed)` builds one small scenario from a seeded random generator. A
malicious message reaches some mailboxes, and people pass it on in the ways mail
really travels: forward inline or as attachment, fan-out, cycles, redirects,
distribution lists and inbox rules. Mail crosses a Microsoft 365 tenant and an
Exchange organisation, and inbox rules sit on mailboxes of both. Decoys sit beside
the copies: replies without the payload, messages with the same subject but no
payload, a disabled rule, and a forward to an outside address.

`HELD_KINDS` are generated only when named: their copies carry no more than medium
evidence, so the tracker must wait for an approval before it pulls them.

Each scenario names its mailboxes `s<seed>.<name>@<domain>`, so many scenarios can
share one world (`combine`) and one worker. The ground truth lists every malicious
copy and every innocent message; the tracker never sees it.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from typing import Any

GRAPH_DOMAIN = "example.com"
EWS_DOMAIN = "corp.example.org"
OUTSIDE_DOMAIN = "example.net"
GRAPH_TENANT = {
    "domain": GRAPH_DOMAIN,
    "platform": "graph",
    "tenant_id": "8d1c6a2e-0c4b-4f4e-9a51-2f6c0b7d3e15",
    "client_id": "5f0e3c9a-7b2d-4c61-8e14-9d3a6b2c1f70",
    "client_secret": "demo-client-secret-for-the-simulator",
    "permissions": ["Mail.ReadWrite", "ExchangeMessageTrace.Read.All"],
}
EWS_TENANT = {"domain": EWS_DOMAIN, "platform": "ews"}
QUARANTINE_MAILBOXES = (f"quarantine@{GRAPH_DOMAIN}", f"quarantine@{EWS_DOMAIN}")
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
KINDS = (
    "chain",
    "fan_out",
    "cycle",
    "distribution_list",
    "redirect_rule",
    "trace_redirect",
    "inbox_rule",
    "deleted_copy",
    "hybrid_chain",
    "decoys",
)
HELD_KINDS = ("medium_forward",)
# Domains of a redirect rule's mailbox and of its target, one pair per layout.
REDIRECT_LAYOUTS = (
    (GRAPH_DOMAIN, GRAPH_DOMAIN),
    (EWS_DOMAIN, EWS_DOMAIN),
    (EWS_DOMAIN, GRAPH_DOMAIN),
)
FORWARD_STYLES = ("attached", "forwarded_header", "references", "attachment_hash")
TRACKING_FIELDS = (
    "date-time,client-ip,source,event-id,internal-message-id,message-id,"
    "recipient-address,related-recipient-address,reference,message-subject,"
    "sender-address"
)


@dataclass
class Scenario:
    """One generated scenario: world fragments, the alert and the ground truth.

    `malicious` lists each (mailbox, bare Message-ID) with a malicious copy
    the tracker must pull, Sent Items copies of forwards included. `innocent`
    lists the messages that must stay untouched. `external` lists the outside
    addresses a copy was sent to, which the incident must report. `sent` lists
    each (sender, Message-ID) of a forward that a person sent. `held` lists the
    malicious copies whose only evidence is medium: held until an analyst approves
    the incident, and not in `malicious`.
    """

    seed: int
    kind: str
    mailboxes: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    forwarding_rules: list[dict[str, Any]] = field(default_factory=list)
    tracking_rows: list[tuple[str, ...]] = field(default_factory=list)
    alert: dict[str, Any] = field(default_factory=dict)
    malicious: set[tuple[str, str]] = field(default_factory=set)
    innocent: set[tuple[str, str]] = field(default_factory=set)
    external: set[str] = field(default_factory=set)
    sent: set[tuple[str, str]] = field(default_factory=set)
    held: set[tuple[str, str]] = field(default_factory=set)
    original_id: str = ""


class _Builder:
    """Builds one scenario's messages step by step."""

    def __init__(self, seed: int, kind: str) -> None:
        # Seeded for repeatable worlds, not for secrecy.
        self.random = random.Random(seed)  # noqa: S311
        self.scenario = Scenario(seed=seed, kind=kind)
        self.clock = START + timedelta(minutes=seed)
        self.serial = 0
        self.url = f"http://pay-{seed}.billing-example.net/invoice/{seed}"
        self.attachment = f"MZ payload of scenario {seed}".encode()
        self.attachment_hash = hashlib.sha256(self.attachment).hexdigest()
        self.subject = f"Invoice {4000 + seed} overdue"
        self.thread_index = base64.b64encode(
            hashlib.sha256(f"thread-{seed}".encode()).digest()[:22]
        ).decode()
        self.known: set[str] = set()

    # --- addresses and time ---------------------------------------------------------

    def mailbox(self, name: str, domain: str = GRAPH_DOMAIN) -> str:
        address = f"s{self.scenario.seed}.{name}@{domain}"
        if address not in self.known:
            self.known.add(address)
            self.scenario.mailboxes.append({"address": address})
        return address

    def later(self, minutes: int = 3) -> datetime:
        self.clock += timedelta(minutes=minutes, seconds=self.random.randint(0, 50))
        return self.clock

    def new_id(self, label: str) -> str:
        self.serial += 1
        return f"{label}.{self.serial}.s{self.scenario.seed}@mail.example.com"

    # --- messages -------------------------------------------------------------------

    def original(self, recipients: list[str]) -> tuple[str, bytes, datetime]:
        """Add the malicious message, delivered to `recipients`, and its alert."""
        message_id = f"invoice.{self.scenario.seed}@billing-example.net"
        sent_at = self.later()
        body = MIMEMultipart("mixed")
        body.attach(MIMEText(f"Your invoice is overdue. Pay at {self.url} today.\n"))
        body.attach(_attachment(self.attachment, "invoice.exe"))
        mime = _finish(
            body,
            message_id=message_id,
            sender="billing@billing-example.net",
            to=recipients,
            subject=self.subject,
            date=sent_at,
            extra={"Thread-Index": self.thread_index},
        )
        self.add_message("original", mime, [(r, "inbox") for r in recipients], True)
        for recipient in recipients:
            self.scenario.malicious.add((recipient, message_id))
        self.scenario.original_id = message_id
        self.scenario.alert = _alert(
            message_id,
            recipients,
            self.subject,
            sent_at,
            self.url,
            self.attachment_hash,
        )
        return message_id, mime, sent_at

    def forward(
        self,
        sender: str,
        recipients: list[str],
        parent_id: str,
        parent_mime: bytes,
        style: str | None = None,
    ) -> tuple[str, bytes]:
        """Add a forward of `parent_mime` from `sender`, sent copy and deliveries."""
        style = style or self.random.choice(FORWARD_STYLES)
        message_id = self.new_id("fwd")
        sent_at = self.later()
        extra: dict[str, str] = {}
        if style == "inline_text":
            # Only the subject and the quoted link tie this forward to the original.
            body = MIMEMultipart("mixed")
            body.attach(MIMEText(f"FYI, please check.\n\n> Pay at {self.url} today.\n"))
        elif style == "attached":
            body = MIMEMultipart("mixed")
            body.attach(MIMEText("See the attached message.\n"))
            inner = MIMEBase("message", "rfc822")
            inner.set_payload([_parse(parent_mime)])
            body.attach(inner)
        else:
            body = MIMEMultipart("mixed")
            body.attach(MIMEText(f"FYI, please check.\n\n> Pay at {self.url} today.\n"))
            if style != "references":
                body.attach(_attachment(self.attachment, "invoice.exe"))
            if style == "forwarded_header":
                extra["X-Forwarded-Message-Id"] = f"<{parent_id}>"
            if style == "references":
                extra["References"] = f"<{parent_id}>"
                extra["In-Reply-To"] = f"<{parent_id}>"
        mime = _finish(
            body,
            message_id=message_id,
            sender=sender,
            to=recipients,
            subject=f"{self.random.choice(('FW', 'Fwd', 'WG', 'TR'))}: {self.subject}",
            date=sent_at,
            extra=extra,
        )
        deliveries = [(sender, "sentitems")]
        internal = [r for r in recipients if not r.endswith(OUTSIDE_DOMAIN)]
        deliveries.extend((r, "inbox") for r in internal)
        self.add_message(f"forward {style}", mime, deliveries, True)
        self.scenario.malicious.add((sender, message_id))
        self.scenario.sent.add((sender, message_id))
        for recipient in recipients:
            if recipient in internal:
                self.scenario.malicious.add((recipient, message_id))
            else:
                self.scenario.external.add(recipient)
        return message_id, mime

    def reply_without_payload(
        self, sender: str, recipient: str, parent_id: str
    ) -> None:
        """Add a reply in the thread that quotes the text but not the link."""
        message_id = self.new_id("reply")
        body = MIMEText(
            "Thanks, I will check with accounting.\n\n> Your invoice is overdue.\n"
        )
        mime = _finish(
            body,
            message_id=message_id,
            sender=sender,
            to=[recipient],
            subject=f"RE: {self.subject}",
            date=self.later(),
            extra={"In-Reply-To": f"<{parent_id}>", "References": f"<{parent_id}>"},
        )
        self.add_message("reply", mime, [(sender, "sentitems"), (recipient, "inbox")])
        self.scenario.innocent.update({(sender, message_id), (recipient, message_id)})

    def same_subject_decoy(self, sender: str, recipient: str) -> None:
        """Add a message with the forward's subject and no payload."""
        message_id = self.new_id("decoy")
        body = MIMEText("The invoice was paid yesterday, ignore the reminder.\n")
        mime = _finish(
            body,
            message_id=message_id,
            sender=sender,
            to=[recipient],
            subject=f"FW: {self.subject}",
            date=self.later(),
        )
        self.add_message("decoy", mime, [(sender, "sentitems"), (recipient, "inbox")])
        self.scenario.innocent.update({(sender, message_id), (recipient, message_id)})

    def bystander(self, mailbox: str) -> None:
        """Add an unrelated message that must stay where it is."""
        message_id = self.new_id("news")
        mime = _finish(
            MIMEText("The canteen is closed on Friday.\n"),
            message_id=message_id,
            sender=f"facilities@{GRAPH_DOMAIN}",
            to=[mailbox],
            subject="Canteen",
            date=self.later(1),
        )
        self.add_message("bystander", mime, [(mailbox, "inbox")])
        self.scenario.innocent.add((mailbox, message_id))

    def add_message(
        self,
        note: str,
        mime: bytes,
        deliveries: list[tuple[str, str]],
        malicious: bool = False,
    ) -> None:
        key = f"s{self.scenario.seed}-{len(self.scenario.messages)}"
        received = self.clock + timedelta(seconds=5)
        self.scenario.messages.append(
            {
                "key": key,
                "raw": mime.decode("utf-8"),
                "malicious": malicious,
                "note": note,
                "deliveries": [
                    {
                        "mailbox": mailbox,
                        "folder": folder,
                        "received": received.isoformat(),
                    }
                    for mailbox, folder in deliveries
                ],
            }
        )

    def track(
        self,
        event: str,
        source: str,
        internal_id: str,
        message_id: str,
        recipients: list[str],
        related: str = "",
        reference: str = "",
        sender: str = "billing@billing-example.net",
    ) -> None:
        moment = self.clock + timedelta(seconds=len(self.scenario.tracking_rows))
        # Internal ids are unique per server, so each scenario gets its own range.
        internal_id = f"{self.scenario.seed}{internal_id}"
        reference = f"{self.scenario.seed}{reference}" if reference else ""
        self.scenario.tracking_rows.append(
            (
                moment.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "",
                source,
                event,
                internal_id,
                f"<{message_id}>",
                ";".join(recipients),
                related,
                reference,
                self.subject,
                sender,
            )
        )


def _attachment(data: bytes, filename: str) -> Message:
    part = MIMEApplication(data, "octet-stream")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _parse(mime: bytes) -> Message:
    from email import message_from_bytes

    return message_from_bytes(mime, policy=compat32)


def _finish(
    body: Message,
    *,
    message_id: str,
    sender: str,
    to: list[str],
    subject: str,
    date: datetime,
    extra: dict[str, str] | None = None,
) -> bytes:
    body["Message-ID"] = f"<{message_id}>"
    body["Date"] = email.utils.format_datetime(date)
    body["From"] = sender
    body["To"] = ", ".join(to)
    body["Subject"] = subject
    for name, value in (extra or {}).items():
        body[name] = value
    text = body.as_bytes(policy=compat32)
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _alert(
    message_id: str,
    recipients: list[str],
    subject: str,
    delivered: datetime,
    url: str,
    attachment_hash: str,
) -> dict[str, Any]:
    """Return a generic JSON alert for the original message."""
    return {
        "json_version": "2.0",
        "summary": subject,
        "classification": "malware",
        "severity": "major",
        "link_attribute": "message_id",
        "detector": {"vendor": "Example Security", "product": "Sandbox"},
        "threat_info": {"name": "Invoice.Dropper", "status": "active"},
        "email": {
            "message_id": f"<{message_id}>",
            "sender": "billing@billing-example.net",
            "recipient": recipients,
            "subject": subject,
            "delivery_time": delivered.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "urls": [url],
            "attachments": [{"name": "invoice.exe", "sha256": attachment_hash}],
        },
    }


# --- the scenario kinds -------------------------------------------------------------


def _chain(b: _Builder, hops: int, domains: list[str]) -> None:
    first = b.mailbox("alice", domains[0])
    original_id, mime, _ = b.original([first, b.mailbox("bob", domains[0])])
    sender, parent_id, parent_mime = first, original_id, mime
    for hop in range(hops):
        recipient = b.mailbox(f"hop{hop}", domains[(hop + 1) % len(domains)])
        parent_id, parent_mime = b.forward(sender, [recipient], parent_id, parent_mime)
        sender = recipient
    b.bystander(sender)


def _fan_out(b: _Builder) -> None:
    alice = b.mailbox("alice")
    original_id, mime, _ = b.original([alice])
    team = [b.mailbox(f"team{n}") for n in range(b.random.randint(2, 4))]
    outside = f"s{b.scenario.seed}.friend@{OUTSIDE_DOMAIN}"
    b.forward(alice, [*team, outside], original_id, mime)
    b.bystander(team[0])


def _cycle(b: _Builder, domains: list[str]) -> None:
    alice = b.mailbox("alice", domains[0])
    bob = b.mailbox("bob", domains[-1])
    original_id, mime, _ = b.original([alice])
    second_id, second = b.forward(alice, [bob], original_id, mime)
    b.forward(bob, [alice], second_id, second)


def _distribution_list(b: _Builder) -> None:
    members = [b.mailbox(f"member{n}", EWS_DOMAIN) for n in range(3)]
    listed = f"s{b.scenario.seed}.finance@{EWS_DOMAIN}"
    original_id, _, _ = b.original(members)
    # The alert names one member; the tracking log shows the list's expansion.
    b.scenario.alert["email"]["recipient"] = [members[0]]
    b.track("RECEIVE", "SMTP", "7001", original_id, [listed])
    b.track("EXPAND", "ROUTING", "7001", original_id, members, related=listed)
    b.track("DELIVER", "STOREDRIVER", "7001", original_id, members)


def _redirect_rule(b: _Builder) -> None:
    home, target = b.random.choice(REDIRECT_LAYOUTS)
    alice = b.mailbox("alice", home)
    deputy = b.mailbox("deputy", target)
    former = b.mailbox("former", home)
    original_id, _, _ = b.original([alice])
    b.scenario.alert["email"]["recipient"] = [alice]
    # The redirect keeps the Message-ID, so the deputy has the original itself.
    b.scenario.messages[-1]["deliveries"].append({"mailbox": deputy, "folder": "inbox"})
    b.scenario.malicious.add((deputy, original_id))
    b.scenario.forwarding_rules.append(
        {"mailbox": alice, "forward_to": [deputy], "kind": "redirect"}
    )
    # A redirect that was switched off sent nothing to the former assistant.
    b.scenario.forwarding_rules.append(
        {"mailbox": alice, "forward_to": [former], "kind": "redirect", "enabled": False}
    )
    b.bystander(deputy)
    b.bystander(former)


def _trace_redirect(b: _Builder) -> None:
    alice = b.mailbox("alice", EWS_DOMAIN)
    assistant = b.mailbox("assistant", EWS_DOMAIN)
    original_id, _, _ = b.original([alice])
    b.scenario.messages[-1]["deliveries"].append(
        {"mailbox": assistant, "folder": "inbox"}
    )
    b.scenario.malicious.add((assistant, original_id))
    b.track("RECEIVE", "SMTP", "7101", original_id, [alice])
    b.track("REDIRECT", "ROUTING", "7101", original_id, [assistant], related=alice)
    b.track("DELIVER", "STOREDRIVER", "7101", original_id, [alice, assistant])


def _inbox_rule(b: _Builder) -> None:
    alice = b.mailbox("alice", EWS_DOMAIN)
    backup = b.mailbox("backup", EWS_DOMAIN)
    original_id, mime, _ = b.original([alice])
    # An inbox rule writes a new message; only the tracking log ties it to the
    # original, through the internal id in its Reference.
    rule_id = b.new_id("rule")
    body = MIMEMultipart("mixed")
    body.attach(MIMEText("Automatically forwarded.\n"))
    inner = MIMEBase("message", "rfc822")
    inner.set_payload([_parse(mime)])
    body.attach(inner)
    rule_mime = _finish(
        body,
        message_id=rule_id,
        sender=alice,
        to=[backup],
        subject=f"FW: {b.subject}",
        date=b.later(),
    )
    b.add_message("inbox rule forward", rule_mime, [(backup, "inbox")], True)
    b.scenario.malicious.add((backup, rule_id))
    b.scenario.forwarding_rules.append(
        {"mailbox": alice, "forward_to": [backup], "kind": "forward_as_attachment"}
    )
    b.track("DELIVER", "STOREDRIVER", "7201", original_id, [alice])
    b.track(
        "RECEIVE", "MAILBOXRULE", "7202", rule_id, [backup], reference="7201",
        sender=alice,
    )  # fmt: skip
    b.track("DELIVER", "STOREDRIVER", "7202", rule_id, [backup], sender=alice)


def _deleted_copy(b: _Builder) -> None:
    alice = b.mailbox("alice")
    carol = b.mailbox("carol")
    original_id, mime, _ = b.original([alice])
    b.forward(alice, [carol], original_id, mime)
    # Alice deleted her copy for good after forwarding it.
    original = b.scenario.messages[0]
    original["deliveries"] = [
        d for d in original["deliveries"] if d["mailbox"] != alice
    ]
    b.scenario.malicious.discard((alice, original_id))


def _decoys(b: _Builder) -> None:
    alice = b.mailbox("alice")
    bob = b.mailbox("bob")
    dora = b.mailbox("dora")
    original_id, mime, _ = b.original([alice])
    b.reply_without_payload(
        alice, f"s{b.scenario.seed}.accounts@{GRAPH_DOMAIN}", original_id
    )
    b.mailbox("accounts")
    b.same_subject_decoy(alice, dora)
    b.forward(alice, [bob], original_id, mime)
    b.reply_without_payload(bob, alice, original_id)


def _medium_forward(b: _Builder) -> None:
    alice = b.mailbox("alice", b.random.choice([GRAPH_DOMAIN, EWS_DOMAIN]))
    bob = b.mailbox("bob", b.random.choice([GRAPH_DOMAIN, EWS_DOMAIN]))
    original_id, mime, _ = b.original([alice])
    forward_id, _ = b.forward(alice, [bob], original_id, mime, style="inline_text")
    # Subject and link are medium evidence only: both copies wait for approval.
    for pair in ((alice, forward_id), (bob, forward_id)):
        b.scenario.malicious.discard(pair)
        b.scenario.held.add(pair)
    b.bystander(bob)


def generate(seed: int, kind: str | None = None) -> Scenario:
    """Build the scenario of `seed`. `kind` overrides the kind the seed selects."""
    chosen = kind or KINDS[seed % len(KINDS)]
    builder = _Builder(seed, chosen)
    if chosen == "chain":
        _chain(builder, builder.random.randint(1, 3), [GRAPH_DOMAIN])
    elif chosen == "fan_out":
        _fan_out(builder)
    elif chosen == "cycle":
        _cycle(
            builder, builder.random.choice([[GRAPH_DOMAIN], [GRAPH_DOMAIN, EWS_DOMAIN]])
        )
    elif chosen == "distribution_list":
        _distribution_list(builder)
    elif chosen == "redirect_rule":
        _redirect_rule(builder)
    elif chosen == "trace_redirect":
        _trace_redirect(builder)
    elif chosen == "inbox_rule":
        _inbox_rule(builder)
    elif chosen == "deleted_copy":
        _deleted_copy(builder)
    elif chosen == "hybrid_chain":
        _chain(builder, 3, [GRAPH_DOMAIN, EWS_DOMAIN])
    elif chosen == "decoys":
        _decoys(builder)
    elif chosen == "medium_forward":
        _medium_forward(builder)
    else:
        raise ValueError(
            f"Scenario kind {chosen!r} is not known; use one of {KINDS + HELD_KINDS}."
        )
    return builder.scenario


def combine(scenarios: list[Scenario], name: str = "forward-tracing") -> dict[str, Any]:
    """Return one world (scenario file data) holding every scenario's mail."""
    mailboxes = [{"address": address} for address in QUARANTINE_MAILBOXES]
    messages: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for scenario in scenarios:
        mailboxes.extend(scenario.mailboxes)
        messages.extend(scenario.messages)
        rules.extend(scenario.forwarding_rules)
    return {
        "name": name,
        "tenants": [GRAPH_TENANT, EWS_TENANT],
        "mailboxes": mailboxes,
        "messages": messages,
        "forwarding_rules": rules,
    }


def tracking_log(scenarios: list[Scenario]) -> str:
    """Return the Exchange message tracking log (MSGTRK CSV) of the scenarios."""
    lines = [
        "#Software: Microsoft Exchange Server",
        "#Version: 15.01.2507.006",
        "#Log-type: Message Tracking Log",
        f"#Date: {START.strftime('%Y-%m-%dT%H:%M:%S.000Z')}",
        f"#Fields: {TRACKING_FIELDS}",
    ]
    for scenario in scenarios:
        lines.extend(",".join(row) for row in scenario.tracking_rows)
    return "\n".join(lines) + "\n"
