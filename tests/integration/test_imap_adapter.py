"""The IMAP adapter against real Dovecot instances on 127.0.0.1.

`dev/dovecot.sh start` runs each instance with its own configuration, maildir
storage and log in a temporary folder, with a master user `admin`. Three profiles
differ only in the CAPABILITY that Dovecot advertises: `full` (UIDPLUS and MOVE),
`plain` (neither, as HCL Domino 12) and `move` (MOVE without UIDPLUS). Every test
makes its own users, so the tests share the instances but no mailbox. The
instances log every change to a message (Dovecot's mail_log plugin), so a test can
read which messages were flagged, expunged or saved.
"""

from __future__ import annotations

import asyncio
import datetime
import imaplib
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autopull.connectors.errors import NotFoundError, PermanentError, TransientError
from autopull.connectors.mail.base import MessageSearch
from autopull.connectors.mail.imap import (
    INCIDENT_HEADER,
    ORIGINAL_FLAGS_HEADER,
    ORIGINAL_FOLDER_HEADER,
    ORIGINAL_MAILBOX_HEADER,
    ImapPlatform,
    ImapQuarantineResult,
    ImapSettings,
    QuarantineMarker,
)
from autopull.streams.pulls import RetryPolicy, execute

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DOVECOT_SCRIPT = REPO_ROOT / "dev" / "dovecot.sh"
MASTER_USER = "admin"
MASTER_PASSWORD = "adminpw"
START_TIMEOUT_S = 60
# Dovecot's log process writes asynchronously; a test waits at most this long for it.
LOG_WAIT_S = 10.0
DATE = '"01-Dec-2026 09:30:00 +0000"'
# Message changes that mail_log records as "<event>: box=..., uid=..., msgid=...".
CHANGE_EVENTS = ("delete", "expunge", "flag_change", "save", "copy")

# Folder names as a person reads them and as modified UTF-7 on the wire.
UNUSUAL_FOLDERS = [
    ("Entwürfe", "Entw&APw-rfe"),
    ("Gelöschte Elemente", "Gel&APY-schte Elemente"),
    ("R&D", "R&-D"),
    ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
    ("Q1 Reports", "Q1 Reports"),
    ('Kunde "Nord"', 'Kunde "Nord"'),
]


# --- the Dovecot fixture --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / "cert.pem"
    key_path = folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Dovecot:
    """One running Dovecot instance, with helpers to make users and inspect them.

    It offers STARTTLS on `port` and IMAPS on `tls_port`, with a certificate for
    127.0.0.1 that `ca_file` signs.
    """

    directory: Path
    port: int
    tls_port: int
    ca_file: Path
    profile: str
    env: dict[str, str]

    @property
    def log_file(self) -> Path:
        return self.directory / "dovecot.log"

    def add_user(self, prefix: str, *, quota_rule: str | None = None) -> str:
        """Create a user with a unique address, in a users file of its own."""
        address = f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"
        self._write_user(address, quota_rule)
        return address

    def set_quota(self, address: str, quota_rule: str) -> None:
        # Dovecot checks a users file it has read at most once a second.
        time.sleep(1.1)
        self._write_user(address, quota_rule)

    def _write_user(self, address: str, quota_rule: str | None) -> None:
        extra = f"userdb_quota_rule={quota_rule}" if quota_rule else ""
        line = f"{address}:{{PLAIN}}secret-{address}::::::{extra}\n"
        (self.directory / "users" / address).write_text(line, encoding="utf-8")

    def settings(self, quarantine: str, **overrides: object) -> ImapSettings:
        values: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "security": "none",
            "master_user": MASTER_USER,
            "master_password": MASTER_PASSWORD,
            "quarantine_mailbox": quarantine,
            "timeout": 10.0,
        }
        values.update(overrides)
        return ImapSettings.model_validate(values)

    def login(self, address: str) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        imap.login(_quote(f"{address}*{MASTER_USER}"), MASTER_PASSWORD)
        return imap

    def changes(self, address: str) -> list[str]:
        """Return the user's logged message changes, once every session has ended."""
        deadline = time.monotonic() + LOG_WAIT_S
        while True:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace")
            lines_of_user = [
                line for line in lines.splitlines() if f"imap({address})<" in line
            ]
            logins = lines.count(f"Login: user=<{address}>")
            ended = sum("Disconnected" in line for line in lines_of_user)
            if logins == ended or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return [
            line.split(": Info: ", 1)[1]
            for line in lines_of_user
            if any(f": Info: {event}: " in line for event in CHANGE_EVENTS)
        ]


def _start(profile: str) -> Dovecot:
    # A short path, because Dovecot's sockets live below it and a socket path has
    # at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="apdv-"))
    cert, key = write_certificate(directory)
    port = _free_port()
    tls_port = _free_port()
    env = {
        **os.environ,
        "AUTOPULL_DOVECOT_DIR": str(directory),
        "AUTOPULL_DOVECOT_PORT": str(port),
        "AUTOPULL_DOVECOT_TLS_PORT": str(tls_port),
        "AUTOPULL_DOVECOT_TLS_CERT": str(cert),
        "AUTOPULL_DOVECOT_TLS_KEY": str(key),
        "AUTOPULL_DOVECOT_PROFILE": profile,
        "AUTOPULL_DOVECOT_MASTER_USER": MASTER_USER,
        "AUTOPULL_DOVECOT_MASTER_PASSWORD": MASTER_PASSWORD,
    }
    command = ["bash", str(DOVECOT_SCRIPT), "start"]
    try:
        result = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"dev/dovecot.sh start timed out after {START_TIMEOUT_S}s for profile "
            f"{profile}:\n{exc.stdout or ''}{exc.stderr or ''}",
            pytrace=False,
        )
    if result.returncode != 0:
        log = directory / "dovecot.log"
        log_text = log.read_text(errors="replace") if log.exists() else "(no log)"
        pytest.fail(
            f"dev/dovecot.sh start failed with exit code {result.returncode} for "
            f"profile {profile} (run 'bash dev/dovecot.sh install' as root first if "
            f"Dovecot is missing):\n{result.stdout}{result.stderr}\n{log_text}",
            pytrace=False,
        )
    return Dovecot(directory, port, tls_port, cert, profile, env)


@pytest.fixture(scope="session")
def dovecot_servers() -> Iterator[Callable[[str], Dovecot]]:
    """Start a Dovecot instance per profile on first use; stop them all at the end."""
    started: dict[str, Dovecot] = {}

    def server(profile: str) -> Dovecot:
        if profile not in started:
            started[profile] = _start(profile)
        return started[profile]

    yield server

    # Dovecot takes a few seconds to stop, so the instances stop in parallel.
    stopping = [
        subprocess.Popen(
            ["bash", str(DOVECOT_SCRIPT), "stop"],
            env=instance.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for instance in started.values()
    ]
    for process in stopping:
        process.wait(timeout=30)
    for instance in started.values():
        shutil.rmtree(instance.directory, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_servers: Callable[[str], Dovecot]) -> Dovecot:
    return dovecot_servers("full")


# --- seeding and reading mailboxes ----------------------------------------------------


def make_message(message_id_field: str, subject: str = "Invoice 4471") -> bytes:
    """Build a small message; `message_id_field` follows "Message-ID:" as it is."""
    return (
        "From: Billing <billing@example.net>\r\n"
        "To: user@example.com\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 01 Dec 2026 09:30:00 +0000\r\n"
        f"Message-ID:{message_id_field}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Please pay the attached invoice.\r\n"
    ).encode()


def seed(
    server: Dovecot,
    address: str,
    wire_folder: str,
    raw: bytes,
    flags: str | None = None,
) -> None:
    """Append a message to a folder of the user, creating the folder."""
    imap = server.login(address)
    try:
        if wire_folder != "INBOX":
            imap.create(_quote(wire_folder))
        typ, data = imap.append(_quote(wire_folder), flags, DATE, raw)
        assert typ == "OK", data
    finally:
        imap.logout()


@dataclass(frozen=True)
class Stored:
    uid: int
    flags: frozenset[str]
    internaldate: str
    raw: bytes


def read_folder(server: Dovecot, address: str, wire_folder: str) -> list[Stored]:
    """Return every message of a folder with its flags, without changing anything."""
    imap = server.login(address)
    try:
        typ, data = imap.select(_quote(wire_folder), readonly=True)
        assert typ == "OK", data
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
        assert typ == "OK", data
    finally:
        imap.logout()
    found = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        head = item[0].decode()
        uid = int(head.split("UID ")[1].split()[0])
        flags = head.split("FLAGS (")[1].split(")")[0].split()
        date = head.split('INTERNALDATE "')[1].split('"')[0]
        found.append(Stored(uid, frozenset(flags) - {"\\Recent"}, date, bytes(item[1])))
    return found


def uidvalidity(server: Dovecot, address: str, wire_folder: str) -> int:
    imap = server.login(address)
    try:
        typ, data = imap.select(_quote(wire_folder), readonly=True)
        assert typ == "OK", data
        _, values = imap.response("UIDVALIDITY")
    finally:
        imap.logout()
    return int(values[-1])


def list_folders(server: Dovecot, address: str) -> set[str]:
    imap = server.login(address)
    try:
        typ, data = imap.list('""', '"*"')
        assert typ == "OK", data
    finally:
        imap.logout()
    return {bytes(item).decode() for item in data if isinstance(item, bytes)}


def incident_id() -> str:
    return f"INC-{uuid.uuid4().hex[:12].upper()}"


def message_id() -> str:
    return f"{uuid.uuid4().hex}.invoice@billing.example.net"


# --- find -----------------------------------------------------------------------------


async def test_find_every_folder_names_them_in_unicode(dovecot: Dovecot) -> None:
    user = dovecot.add_user("paul")
    bare = message_id()
    raw = make_message(f" <{bare}>")
    folders = [
        ("INBOX", "INBOX"),
        ("Junk", "Junk"),
        ("Trash", "Trash"),
        ("Projects", "Projects"),
        *UNUSUAL_FOLDERS,
    ]
    for index, (_, wire) in enumerate(folders):
        seed(dovecot, user, wire, raw, "(\\Seen)" if index % 2 else None)
    # An id that contains the wanted one matches IMAP's substring search, not find.
    seed(dovecot, user, "INBOX", make_message(f" <x{bare}>"))
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    copies = await platform.find(user, f"<{bare}>")

    assert sorted(c.folder for c in copies) == sorted(name for name, _ in folders)
    read = {c.folder: c.read for c in copies}
    assert read == {name: bool(i % 2) for i, (name, _) in enumerate(folders)}
    assert {c.message_id for c in copies} == {bare}
    assert {c.subject for c in copies} == {"Invoice 4471"}
    assert all(c.received_at is not None for c in copies)


@pytest.mark.parametrize(
    "field_value",
    [
        " <[ABCDEF====@example.com]>",
        " <[gw10].1c69fb81.7aec0.5503SMTPIN_ADDED_[gw5]@[gw13].mail.example.com>",
        " <113c01d86b4a$53bb4230$fa9e45a$@appmanager@example.net>",
        " <00E19E93-513A-4A2B-964B-BB0372099DB6@@example.com>",
        " <2415681bce7c00293a83fce817e928a4>",
        "\r\n <PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail."
        "example.com>",
        ' <"quoted\\\\local"@example.com>',
    ],
    ids=["brackets", "gateway", "two-at", "double-at", "no-at", "folded", "quotes"],
)
async def test_find_odd_message_ids_exactly(dovecot: Dovecot, field_value: str) -> None:
    user = dovecot.add_user("uma")
    seed(dovecot, user, "INBOX", make_message(field_value))
    bare = field_value.strip()[1:-1]
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    copies = await platform.find(user, f" <{bare}>")

    assert [c.folder for c in copies] == ["INBOX"]
    assert copies[0].message_id == bare


async def test_find_absent_message_returns_nothing(dovecot: Dovecot) -> None:
    user = dovecot.add_user("empty")
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    assert await platform.find(user, message_id()) == []


async def test_find_with_sasl_plain_login(dovecot: Dovecot) -> None:
    user = dovecot.add_user("sasl")
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"))
    settings = dovecot.settings(dovecot.add_user("vault"), login_method="sasl_plain")

    copies = await ImapPlatform(settings).find(user, bare)

    assert [c.folder for c in copies] == ["INBOX"]


# --- quarantine and restore -----------------------------------------------------------


async def test_quarantine_and_restore_every_folder(dovecot: Dovecot) -> None:
    user = dovecot.add_user("paul")
    vault = dovecot.add_user("vault")
    bare = message_id()
    raw = make_message(f" <{bare}>")
    folders = [
        ("INBOX", "INBOX"),
        ("Junk", "Junk"),
        ("Trash", "Trash"),
        *UNUSUAL_FOLDERS,
    ]
    flag_sets = ["(\\Seen)", None, "(\\Seen \\Flagged $Label1)", "(\\Answered)"]
    for index, (_, wire) in enumerate(folders):
        seed(dovecot, user, wire, raw, flag_sets[index % len(flag_sets)])
    before = {wire: read_folder(dovecot, user, wire) for _, wire in folders}
    listing = list_folders(dovecot, user)
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()

    result = await platform.quarantine(user, bare, incident)

    assert isinstance(result, ImapQuarantineResult)
    assert result.already_done is False
    assert result.pending_expunge == ()
    assert sorted(c.folder for c in result.copies) == sorted(n for n, _ in folders)
    assert result.evidence_location == f"{vault}/Quarantine/{incident}"
    assert await platform.find(user, bare) == []
    for _, wire in folders:
        assert read_folder(dovecot, user, wire) == []
    copies = read_folder(dovecot, vault, f"Quarantine/{incident}")
    assert len(copies) == len(folders)
    assert all(c.raw.endswith(raw) for c in copies)
    assert all(f"{INCIDENT_HEADER}: {incident}".encode() in c.raw for c in copies)
    assert all(f"{ORIGINAL_MAILBOX_HEADER}: {user}".encode() in c.raw for c in copies)
    assert sum(b"=?utf-8?" in c.raw for c in copies) == 3
    assert list_folders(dovecot, user) == listing

    restored = await platform.restore(user, bare, incident)

    assert restored.already_done is False
    assert sorted(c.folder for c in restored.copies) == sorted(n for n, _ in folders)
    for _, wire in folders:
        (original,) = before[wire]
        (back,) = read_folder(dovecot, user, wire)
        assert back.raw == original.raw
        assert back.flags == original.flags
        assert back.internaldate == original.internaldate
    assert read_folder(dovecot, vault, f"Quarantine/{incident}") == []
    assert list_folders(dovecot, user) == listing


async def test_quarantine_marker_headers_name_the_original(dovecot: Dovecot) -> None:
    user = dovecot.add_user("paul")
    vault = dovecot.add_user("vault")
    bare = message_id()
    seed(dovecot, user, "Entw&APw-rfe", make_message(f" <{bare}>"), "(\\Seen $Label1)")
    incident = incident_id()

    await ImapPlatform(dovecot.settings(vault)).quarantine(user, bare, incident)

    (copy,) = read_folder(dovecot, vault, f"Quarantine/{incident}")
    header = copy.raw.split(b"\r\n\r\n")[0].decode()
    assert header.startswith(f"{INCIDENT_HEADER}: {incident}\r\n")
    assert f"{ORIGINAL_FOLDER_HEADER}: =?utf-8?" in header
    assert f"{ORIGINAL_FLAGS_HEADER}: (\\Seen $Label1)" in header
    assert copy.flags == {"\\Seen", "$Label1"}


async def test_quarantine_twice_second_does_nothing(dovecot: Dovecot) -> None:
    user = dovecot.add_user("ivan")
    vault = dovecot.add_user("vault")
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"), "(\\Seen)")
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()
    await platform.quarantine(user, bare, incident)
    vault_changes = dovecot.changes(vault)

    again = await platform.quarantine(user, bare, incident)

    assert again.already_done is True
    assert [(c.folder, c.read) for c in again.copies] == [("INBOX", True)]
    assert len(read_folder(dovecot, vault, f"Quarantine/{incident}")) == 1
    assert dovecot.changes(vault) == vault_changes


async def test_two_identical_quarantines_copy_once(dovecot: Dovecot) -> None:
    user = dovecot.add_user("jan")
    vault = dovecot.add_user("vault")
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"))
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()

    first, second = await asyncio.gather(
        platform.quarantine(user, bare, incident),
        platform.quarantine(user, bare, incident),
    )

    assert sorted([first.already_done, second.already_done]) == [False, True]
    assert len(read_folder(dovecot, vault, f"Quarantine/{incident}")) == 1
    assert read_folder(dovecot, user, "INBOX") == []


async def test_restore_twice_second_does_nothing(dovecot: Dovecot) -> None:
    user = dovecot.add_user("ivan")
    vault = dovecot.add_user("vault")
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"))
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()
    await platform.quarantine(user, bare, incident)
    await platform.restore(user, bare, incident)
    user_changes = dovecot.changes(user)

    again = await platform.restore(user, bare, incident)

    assert again.already_done is True
    assert [c.folder for c in again.copies] == ["INBOX"]
    assert len(read_folder(dovecot, user, "INBOX")) == 1
    assert dovecot.changes(user) == user_changes


async def test_quarantine_after_crash_appends_nothing(dovecot: Dovecot) -> None:
    user = dovecot.add_user("kim")
    vault = dovecot.add_user("vault")
    bare = message_id()
    raw = make_message(f" <{bare}>")
    seed(dovecot, user, "INBOX", raw)
    (original,) = read_folder(dovecot, user, "INBOX")
    incident = incident_id()
    # As if an earlier run had appended and verified its copy, then crashed.
    marker = QuarantineMarker(
        incident, user, "INBOX", (), uidvalidity(dovecot, user, "INBOX"), original.uid
    )
    seed(dovecot, vault, f"Quarantine/{incident}", marker.headers() + raw)
    vault_changes = dovecot.changes(vault)

    result = await ImapPlatform(dovecot.settings(vault)).quarantine(
        user, bare, incident
    )

    assert result.already_done is False
    assert read_folder(dovecot, user, "INBOX") == []
    assert len(read_folder(dovecot, vault, f"Quarantine/{incident}")) == 1
    assert dovecot.changes(vault) == vault_changes


async def test_same_message_in_two_folders_pulled_from_both(dovecot: Dovecot) -> None:
    user = dovecot.add_user("lena")
    vault = dovecot.add_user("vault")
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"), "(\\Seen)")
    seed(dovecot, user, "Archive", make_message(f" <{bare}>"))
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()

    result = await platform.quarantine(user, bare, incident)

    assert sorted((c.folder, c.read) for c in result.copies) == [
        ("Archive", False),
        ("INBOX", True),
    ]
    assert await platform.find(user, bare) == []
    assert len(read_folder(dovecot, vault, f"Quarantine/{incident}")) == 2

    restored = await platform.restore(user, bare, incident)

    assert sorted((c.folder, c.read) for c in restored.copies) == [
        ("Archive", False),
        ("INBOX", True),
    ]


async def test_restore_into_deleted_folder_goes_to_inbox(dovecot: Dovecot) -> None:
    user = dovecot.add_user("nina")
    vault = dovecot.add_user("vault")
    bare = message_id()
    seed(dovecot, user, "Projects", make_message(f" <{bare}>"))
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()
    await platform.quarantine(user, bare, incident)
    imap = dovecot.login(user)
    imap.delete('"Projects"')
    imap.logout()

    restored = await platform.restore(user, bare, incident)

    assert [c.folder for c in restored.copies] == ["INBOX"]
    assert len(restored.notes) == 1
    assert "Projects" in restored.notes[0]
    assert "Projects" not in " ".join(list_folders(dovecot, user))


async def test_quarantine_absent_message_raises_not_found(dovecot: Dovecot) -> None:
    user = dovecot.add_user("otto")
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    with pytest.raises(NotFoundError):
        await platform.quarantine(user, message_id(), incident_id())
    with pytest.raises(NotFoundError):
        await platform.restore(user, message_id(), incident_id())


async def test_one_connection_per_mailbox_serves_parallel_pulls(
    dovecot: Dovecot,
) -> None:
    vault = dovecot.add_user("vault")
    users = [dovecot.add_user("par") for _ in range(3)]
    bares = [message_id() for _ in range(3)]
    for user in users:
        for bare in bares:
            seed(dovecot, user, "INBOX", make_message(f" <{bare}>"))
    settings = dovecot.settings(vault, max_connections_per_mailbox=1)
    platform = ImapPlatform(settings)
    incident = incident_id()

    results = await asyncio.wait_for(
        asyncio.gather(
            *(platform.quarantine(u, b, incident) for u in users for b in bares)
        ),
        timeout=120,
    )

    assert len(results) == 9
    assert all(len(r.copies) == 1 for r in results)
    assert len(read_folder(dovecot, vault, f"Quarantine/{incident}")) == 9


# --- without MOVE or UIDPLUS, and a rejected copy -----------------------------------


async def test_refused_append_touches_nothing(dovecot: Dovecot) -> None:
    """A full quarantine mailbox rejects the APPEND with NO [OVERQUOTA].

    The quarantine user has a quota of one message and contains one already.
    """
    user = dovecot.add_user("olga")
    vault = dovecot.add_user("vault", quota_rule="*:messages=1")
    seed(dovecot, vault, "INBOX", make_message(f" <{message_id()}>"))
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"), "(\\Seen)")
    seed(dovecot, user, "INBOX", make_message(f" <{message_id()}>"), "(\\Deleted)")
    before = read_folder(dovecot, user, "INBOX")
    changes = dovecot.changes(user)
    platform = ImapPlatform(dovecot.settings(vault))
    incident = incident_id()

    with pytest.raises(TransientError) as caught:
        await platform.quarantine(user, bare, incident)

    assert "OVERQUOTA" in str(caught.value)
    assert read_folder(dovecot, user, "INBOX") == before
    assert dovecot.changes(user) == changes

    dovecot.set_quota(vault, "*:messages=100")
    result = await platform.quarantine(user, bare, incident)

    assert [c.folder for c in result.copies] == ["INBOX"]
    left = read_folder(dovecot, user, "INBOX")
    assert [m.flags for m in left] == [frozenset({"\\Deleted"})]
    assert len(read_folder(dovecot, vault, f"Quarantine/{incident}")) == 1


async def test_without_uidplus_other_deleted_message_stays(
    dovecot_servers: Callable[[str], Dovecot],
) -> None:
    server = dovecot_servers("plain")
    user = server.add_user("olga")
    vault = server.add_user("vault")
    bare = message_id()
    seed(server, user, "INBOX", make_message(f" <{bare}>"))
    other = make_message(f" <{message_id()}>", subject="Lunch")
    seed(server, user, "INBOX", other, "(\\Deleted)")
    platform = ImapPlatform(server.settings(vault))
    incident = incident_id()

    result = await platform.quarantine(user, bare, incident)

    assert isinstance(result, ImapQuarantineResult)
    assert result.already_done is False
    assert [c.folder for c in result.pending_expunge] == ["INBOX"]
    assert "not expunged" in result.notes[0]
    inbox = read_folder(server, user, "INBOX")
    assert [m.raw for m in inbox] == [make_message(f" <{bare}>"), other]
    assert all("\\Deleted" in m.flags for m in inbox)
    assert not any(c.startswith("expunge:") for c in server.changes(user))
    assert len(read_folder(server, vault, f"Quarantine/{incident}")) == 1

    again = await platform.quarantine(user, bare, incident)

    assert again.already_done is True
    assert len(read_folder(server, vault, f"Quarantine/{incident}")) == 1

    restored = await platform.restore(user, bare, incident)

    assert [(c.folder, c.read) for c in restored.copies] == [("INBOX", False)]
    inbox = read_folder(server, user, "INBOX")
    assert [m.flags for m in inbox] == [frozenset(), frozenset({"\\Deleted"})]
    assert read_folder(server, vault, f"Quarantine/{incident}") == []


async def test_move_without_uidplus_expunges_only_target(
    dovecot_servers: Callable[[str], Dovecot],
) -> None:
    server = dovecot_servers("move")
    user = server.add_user("olga")
    vault = server.add_user("vault")
    bare = message_id()
    seed(server, user, "INBOX", make_message(f" <{bare}>"))
    other = make_message(f" <{message_id()}>", subject="Lunch")
    seed(server, user, "INBOX", other, "(\\Deleted)")
    listing = list_folders(server, user)
    platform = ImapPlatform(server.settings(vault))
    incident = incident_id()

    result = await platform.quarantine(user, bare, incident)

    assert isinstance(result, ImapQuarantineResult)
    assert result.pending_expunge == ()
    inbox = read_folder(server, user, "INBOX")
    assert [(m.raw, m.flags) for m in inbox] == [(other, frozenset({"\\Deleted"}))]
    assert list_folders(server, user) == listing
    assert len(read_folder(server, vault, f"Quarantine/{incident}")) == 1


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_find_over_verified_tls(dovecot: Dovecot, security: str) -> None:
    user = dovecot.add_user("tina")
    bare = message_id()
    seed(dovecot, user, "INBOX", make_message(f" <{bare}>"))
    port = dovecot.tls_port if security == "tls" else dovecot.port
    settings = dovecot.settings(
        dovecot.add_user("vault"),
        security=security,
        port=port,
        ca_file=str(dovecot.ca_file),
    )

    copies = await ImapPlatform(settings).find(user, bare)

    assert [c.folder for c in copies] == ["INBOX"]


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_untrusted_certificate_is_permanent(
    dovecot: Dovecot, security: str
) -> None:
    port = dovecot.tls_port if security == "tls" else dovecot.port
    settings = dovecot.settings(dovecot.add_user("vault"), security=security, port=port)

    with pytest.raises(PermanentError) as caught:
        await ImapPlatform(settings).find("tina@example.com", message_id())

    assert "certificate" in str(caught.value)


async def test_wrong_master_password_is_permanent(dovecot: Dovecot) -> None:
    user = dovecot.add_user("pia")
    settings = dovecot.settings(dovecot.add_user("vault"), master_password="wrong")

    with pytest.raises(PermanentError) as caught:
        await ImapPlatform(settings).find(user, message_id())

    assert "AUTHENTICATIONFAILED" in str(caught.value)
    assert "wrong" not in str(caught.value)


async def test_unknown_user_is_not_found(dovecot: Dovecot) -> None:
    settings = dovecot.settings(dovecot.add_user("vault"))

    with pytest.raises(NotFoundError) as caught:
        await ImapPlatform(settings).find("nobody@example.com", message_id())

    assert caught.value.mailbox == "nobody@example.com"


async def test_closed_port_is_transient(dovecot: Dovecot) -> None:
    settings = dovecot.settings(dovecot.add_user("vault"), port=_free_port())

    with pytest.raises(TransientError):
        await ImapPlatform(settings).find("pia@example.com", message_id())


# --- search by sender, subject and arrival time ---------------------------------------

SEARCH_WINDOW = MessageSearch(
    senders=("billing@example.net",),
    subject="Invoice 4471",
    received_after=datetime.datetime(2026, 12, 1, 9, 20, tzinfo=datetime.UTC),
    received_before=datetime.datetime(2026, 12, 1, 9, 40, tzinfo=datetime.UTC),
)


def seed_at(
    server: Dovecot, address: str, wire_folder: str, raw: bytes, internaldate: str
) -> None:
    """Append a message to a folder of the user with the given INTERNALDATE."""
    imap = server.login(address)
    try:
        if wire_folder != "INBOX":
            imap.create(_quote(wire_folder))
        typ, data = imap.append(_quote(wire_folder), None, f'"{internaldate}"', raw)
        assert typ == "OK", data
    finally:
        imap.logout()


def searched_message(bare: str, subject: str, sender: str = "") -> bytes:
    raw = make_message(f" <{bare}>", subject)
    if sender:
        raw = raw.replace(b"From: Billing <billing@example.net>", sender.encode())
    return raw


def search_command(mailbox: str) -> dict[str, object]:
    moment = SEARCH_WINDOW.received_after
    return {
        "command_id": f"INC-1:quarantine:{mailbox}:queue-id-1@no-message-id",
        "incident_id": "INC-1",
        "kind": "quarantine",
        "mailbox": mailbox,
        "message_id": "queue-id-1@no-message-id",
        "alert_id": f"fireeye:1:{mailbox}",
        "alert_received_at": moment,
        "issued_at": moment,
        "recipient_type": "original",
        "reason": "",
        "attempt": 1,
        "not_before": None,
        "search": {
            "senders": list(SEARCH_WINDOW.senders),
            "subject": SEARCH_WINDOW.subject,
            "received_after": SEARCH_WINDOW.received_after,
            "received_before": SEARCH_WINDOW.received_before,
        },
        "resolved_message_id": None,
    }


def seed_near_misses(server: Dovecot, user: str) -> dict[str, str]:
    """Seed the one matching message in two folders and three that must not match."""
    ids = {name: message_id() for name in ("match", "subject", "late", "sender")}
    match = searched_message(ids["match"], "Invoice 4471")
    seed_at(server, user, "INBOX", match, "01-Dec-2026 09:30:02 +0000")
    seed_at(server, user, "Projects", match, "01-Dec-2026 09:30:02 +0000")
    seed_at(
        server,
        user,
        "INBOX",
        searched_message(ids["subject"], "Invoice 4471 paid"),
        "01-Dec-2026 09:31:00 +0000",
    )
    seed_at(
        server,
        user,
        "INBOX",
        searched_message(ids["late"], "Invoice 4471"),
        "01-Dec-2026 11:00:00 +0000",
    )
    seed_at(
        server,
        user,
        "INBOX",
        searched_message(ids["sender"], "Invoice 4471", "From: other@example.net"),
        "01-Dec-2026 09:30:30 +0000",
    )
    return ids


async def test_search_window_sender_subject(dovecot: Dovecot) -> None:
    user = dovecot.add_user("quinn")
    ids = seed_near_misses(dovecot, user)
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    copies = await platform.search(user, SEARCH_WINDOW)

    assert sorted(c.folder for c in copies) == ["INBOX", "Projects"]
    assert {c.message_id for c in copies} == {ids["match"]}
    assert {c.sender for c in copies} == {"billing@example.net"}
    assert {c.mailbox for c in copies} == {user}


async def test_search_encoded_subject_sender_header(dovecot: Dovecot) -> None:
    user = dovecot.add_user("rhea")
    bare = message_id()
    raw = searched_message(
        bare,
        "=?utf-8?q?Invoice_4471?=",
        "From: Other <other@example.net>\r\nSender: Billing@Example.net",
    )
    seed_at(dovecot, user, "INBOX", raw, "01-Dec-2026 09:35:00 +0000")
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    copies = await platform.search(user, SEARCH_WINDOW)

    assert [c.message_id for c in copies] == [bare]
    assert copies[0].sender == "billing@example.net"
    assert copies[0].subject == "Invoice 4471"


async def test_search_pull_unique_quarantines_only_it(dovecot: Dovecot) -> None:
    user = dovecot.add_user("sam")
    vault = dovecot.add_user("vault")
    ids = seed_near_misses(dovecot, user)
    platform = ImapPlatform(dovecot.settings(vault))

    result = await execute(search_command(user), {user: platform}.get, RetryPolicy())

    assert result.outcome["status"] == "quarantined"
    assert result.outcome["resolved_message_id"] == ids["match"]
    assert result.outcome["copies"] == 2
    left = await platform.search(user, SEARCH_WINDOW)
    assert left == []
    for name in ("subject", "late", "sender"):
        assert [c.folder for c in await platform.find(user, ids[name])] == ["INBOX"]


async def test_search_pull_two_messages_held(dovecot: Dovecot) -> None:
    user = dovecot.add_user("tess")
    first, second = message_id(), message_id()
    seed_at(
        dovecot,
        user,
        "INBOX",
        searched_message(first, "Invoice 4471"),
        "01-Dec-2026 09:25:00 +0000",
    )
    seed_at(
        dovecot,
        user,
        "INBOX",
        searched_message(second, "Invoice 4471"),
        "01-Dec-2026 09:38:00 +0000",
    )
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    result = await execute(search_command(user), {user: platform}.get, RetryPolicy())

    assert result.outcome["status"] == "held"
    candidates = result.outcome["candidates"]
    assert sorted(c["message_id"] for c in candidates) == sorted([first, second])
    assert [c.folder for c in await platform.find(user, first)] == ["INBOX"]
    assert [c.folder for c in await platform.find(user, second)] == ["INBOX"]


# --- sent messages for forward tracing ------------------------------------------------


def make_forward(bare: str, original: str, date: str) -> bytes:
    """Build a forward of `original` as the user's mail client would store it."""
    return (
        "From: Paul <user@example.com>\r\n"
        "To: Rita <rita@example.com>, friend@example.net\r\n"
        "Subject: FW: Invoice 4471\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{bare}>\r\n"
        f"X-Forwarded-Message-Id: <{original}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Pay at http://billing.example.net/pay now.\r\n"
    ).encode()


async def test_sent_since_reads_sent_folder(dovecot: Dovecot) -> None:
    user = dovecot.add_user("sender")
    original = message_id()
    recent, older = message_id(), message_id()
    seed(
        dovecot,
        user,
        "Sent",
        make_forward(recent, original, "Tue, 01 Dec 2026 10:00:00 +0000"),
    )
    seed(
        dovecot,
        user,
        "Sent",
        make_forward(older, original, "Mon, 30 Nov 2026 08:00:00 +0000"),
    )
    seed(dovecot, user, "INBOX", make_message(f" <{original}>"))
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    sent = await platform.sent_since(
        user, datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.UTC)
    )

    assert [message.message_id for message in sent] == [recent]
    message = sent[0]
    assert message.recipients == ("rita@example.com", "friend@example.net")
    assert message.headers["X-Forwarded-Message-Id"] == f"<{original}>"
    assert message.urls == ("http://billing.example.net/pay",)
    assert message.sent_at == datetime.datetime(2026, 12, 1, 10, 0, tzinfo=datetime.UTC)


async def test_sent_since_without_sent_folder(dovecot: Dovecot) -> None:
    user = dovecot.add_user("quiet")
    seed(dovecot, user, "INBOX", make_message(f" <{message_id()}>"))
    platform = ImapPlatform(dovecot.settings(dovecot.add_user("vault")))

    assert (
        await platform.sent_since(
            user, datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
        )
        == []
    )
