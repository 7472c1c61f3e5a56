"""LDAP connections through ldap3, and the one place where ldap3 errors are mapped.

ldap3 is synchronous and its connections are not safe to share between threads.
So `SessionPool.run` takes one bound connection per call, lends it to a single
thread, and discards it when a call fails. ldap3 carries no type information, so
every value read from it is converted here to plain typed values.

`map_ldap_error` translates ldap3 and socket errors into
`autopull.connectors.errors` classes, and callers use it at one boundary.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ldap3 import (
    ANONYMOUS,
    DEREF_NEVER,
    NONE,
    SIMPLE,
    SUBTREE,
    SYNC,
    Connection,
    Server,
    Tls,
)
from ldap3.core import exceptions as ldap_errors
from ldap3.core.results import RESULT_SUCCESS

from autopull.connectors.errors import ConnectorError, PermanentError, TransientError

from .parse import Entry, entry_from_raw
from .settings import DirectorySettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLATFORM = "ldap"
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"
_DETAIL_LIMIT = 300

_CHECK_CREDENTIALS = "Check directory.bind_dn and directory.password."
_USE_TLS = "Use an ldaps:// URL or set directory.start_tls."
_CHECK_URL = "Check directory.url."
_RETRIED = "The lookup is retried."
_RECONNECTED = "The lookup is retried on a new connection."

# Checked in order, so a subclass comes before its base class. Each row contains the
# ldap3 (or socket) error, the class it maps to, what went wrong, and what to do.
ERROR_RULES: tuple[tuple[type[BaseException], type[ConnectorError], str, str], ...] = (
    (
        ssl.SSLCertVerificationError,
        PermanentError,
        "the server's TLS certificate could not be verified",
        "Set directory.ca_file to the CA that signs it.",
    ),
    (
        ldap_errors.LDAPInvalidCredentialsResult,
        PermanentError,
        "the server rejected the bind credentials",
        _CHECK_CREDENTIALS,
    ),
    (
        ldap_errors.LDAPInappropriateAuthenticationResult,
        PermanentError,
        "the server does not accept this kind of bind for the account",
        _CHECK_CREDENTIALS,
    ),
    (
        ldap_errors.LDAPAuthMethodNotSupportedResult,
        PermanentError,
        "the server does not accept simple binds",
        "Use an account that may bind with a password.",
    ),
    (
        ldap_errors.LDAPStrongerAuthRequiredResult,
        PermanentError,
        "the server requires a protected connection",
        _USE_TLS,
    ),
    (
        ldap_errors.LDAPConfidentialityRequiredResult,
        PermanentError,
        "the server requires a protected connection",
        _USE_TLS,
    ),
    (
        ldap_errors.LDAPInsufficientAccessRightsResult,
        PermanentError,
        "the bind account may not read the entries",
        "Grant it read access below directory.base_dn.",
    ),
    (
        ldap_errors.LDAPNoSuchObjectResult,
        PermanentError,
        "the search base does not exist or is hidden from the bind account",
        "Check directory.base_dn and the account's read access.",
    ),
    (
        ldap_errors.LDAPInvalidDNSyntaxResult,
        PermanentError,
        "the server rejected a DN as invalid",
        "Check directory.base_dn and directory.bind_dn.",
    ),
    (
        ldap_errors.LDAPOperationsErrorResult,
        PermanentError,
        "the server refused the operation, as Active Directory does before a "
        "successful bind",
        _CHECK_CREDENTIALS,
    ),
    (
        ldap_errors.LDAPSizeLimitExceededResult,
        PermanentError,
        "the server returned only part of a result because of its size limit",
        "Raise the size limit of the bind account or lower directory.paged_size.",
    ),
    (
        ldap_errors.LDAPAdminLimitExceededResult,
        PermanentError,
        "a search exceeded an administrative limit of the server",
        "Lower directory.paged_size or directory.member_batch_size.",
    ),
    (
        ldap_errors.LDAPTimeLimitExceededResult,
        TransientError,
        "a search exceeded the server's time limit",
        _RETRIED,
    ),
    (ldap_errors.LDAPBusyResult, TransientError, "the server is busy", _RETRIED),
    (
        ldap_errors.LDAPUnavailableResult,
        TransientError,
        "the server is unavailable",
        _RETRIED,
    ),
    (
        ldap_errors.LDAPCommunicationError,
        TransientError,
        "the connection could not be opened or was closed",
        _RECONNECTED,
    ),
    (
        ldap_errors.LDAPResponseTimeoutError,
        TransientError,
        "the server did not respond in time",
        _RECONNECTED,
    ),
    (
        ldap_errors.LDAPMaximumRetriesError,
        TransientError,
        "the server could not be reached",
        _RECONNECTED,
    ),
    (
        ldap_errors.LDAPStartTLSError,
        PermanentError,
        "StartTLS failed",
        "Check that the server offers StartTLS, or use an ldaps:// URL.",
    ),
    (ldap_errors.LDAPBindError, PermanentError, "the bind failed", _CHECK_CREDENTIALS),
    (
        ldap_errors.LDAPInvalidFilterError,
        PermanentError,
        "a search filter is invalid",
        "Check directory.user_filter and directory.group_object_class.",
    ),
    (
        ldap_errors.LDAPInvalidServerError,
        PermanentError,
        "the server address is invalid",
        _CHECK_URL,
    ),
    (
        ldap_errors.LDAPInvalidPortError,
        PermanentError,
        "the server port is invalid",
        _CHECK_URL,
    ),
    (
        ldap_errors.LDAPOperationResult,
        PermanentError,
        "the server rejected the request",
        "Check the directory settings against the server's log.",
    ),
    (
        ldap_errors.LDAPException,
        PermanentError,
        "ldap3 could not run the request",
        "Check the directory settings.",
    ),
    (OSError, TransientError, "the connection failed", _RECONNECTED),
)


def map_ldap_error(error: BaseException, url: str) -> ConnectorError:
    """Return the connector error for an ldap3 or socket error raised while using `url`.

    An error that no rule covers becomes a PermanentError, so nothing unknown is
    retried without end.
    """
    error_class, reason, next_step = _rule_for(error)
    return error_class(
        f"A directory lookup at {url} failed because {reason} "
        f"({type(error).__name__}: {_error_detail(error)}). {next_step}",
        platform=PLATFORM,
    )


def _rule_for(error: BaseException) -> tuple[type[ConnectorError], str, str]:
    for upstream, error_class, reason, next_step in ERROR_RULES:
        if isinstance(error, upstream):
            return error_class, reason, next_step
    return PermanentError, "an unexpected error occurred", "Check the settings."


def _error_detail(error: BaseException) -> str:
    description = getattr(error, "description", None)
    message = getattr(error, "message", None)
    if isinstance(description, str) and description:
        text = f"{description}: {message}" if message else description
    else:
        text = str(error) or "no detail"
    return text[:_DETAIL_LIMIT]


class LdapSession:
    """One bound ldap3 connection, used by a single thread at a time."""

    def __init__(self, connection: Any, settings: DirectorySettings) -> None:
        self._connection = connection
        self._settings = settings

    @classmethod
    def open(cls, settings: DirectorySettings) -> LdapSession:
        """Connect to the server of `settings`, send StartTLS if set, and bind."""
        connection = Connection(
            _server(settings),
            user=settings.bind_dn or None,
            password=_password(settings),
            authentication=SIMPLE if settings.bind_dn else ANONYMOUS,
            client_strategy=SYNC,
            read_only=True,
            raise_exceptions=True,
            auto_referrals=False,
            receive_timeout=settings.receive_timeout_seconds,
        )
        session = cls(connection, settings)
        try:
            connection.open(read_server_info=False)
            if settings.start_tls:
                connection.start_tls(read_server_info=False)
            if not connection.bind(read_server_info=False):
                raise ldap_errors.LDAPBindError(
                    f"The bind as {settings.bind_dn or 'anonymous'} failed."
                )
        except BaseException:
            session.close()
            raise
        return session

    @property
    def closed(self) -> bool:
        """True when ldap3 saw the socket close."""
        return bool(self._connection.closed)

    def search(
        self, base: str, search_filter: str, attributes: Sequence[str]
    ) -> list[Entry]:
        """Return every entry below `base` that matches `search_filter`, page by page.

        Search references (referrals to other servers) are skipped. A result cut
        short by the server's size or time limit raises instead of being returned
        in part.
        """
        entries: list[Entry] = []
        cookie: bytes | None = None
        while True:
            self._connection.search(
                search_base=base,
                search_filter=search_filter,
                search_scope=SUBTREE,
                dereference_aliases=DEREF_NEVER,
                attributes=list(attributes) or ["1.1"],
                paged_size=self._settings.paged_size,
                paged_cookie=cookie,
            )
            result: dict[str, Any] = self._connection.result
            _check_complete(result)
            entries.extend(_entries(self._connection.response))

            cookie = _paged_cookie(result)
            if not cookie:
                return entries

    def close(self) -> None:
        """Unbind and close the socket, ignoring errors of a connection already lost."""
        try:
            self._connection.unbind()
        except (ldap_errors.LDAPException, OSError):
            logger.debug("LDAP unbind failed on a closed connection", exc_info=True)


def _server(settings: DirectorySettings) -> Any:
    parts = urlsplit(settings.url)
    use_ssl = parts.scheme.lower() == "ldaps"
    tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca_file)
    return Server(
        parts.hostname or "",
        port=parts.port or (636 if use_ssl else 389),
        use_ssl=use_ssl,
        tls=tls,
        get_info=NONE,
        connect_timeout=settings.connect_timeout_seconds,
    )


def _password(settings: DirectorySettings) -> str | None:
    if settings.password is None:
        return None
    return settings.password.get_secret_value()


def _check_complete(result: dict[str, Any]) -> None:
    # ldap3 raises for most result codes but not for sizeLimitExceeded and
    # timeLimitExceeded, which would let a partial result pass as complete.
    code = result.get("result")
    if code != RESULT_SUCCESS:
        raise ldap_errors.LDAPOperationResult(
            result=code,
            description=result.get("description"),
            message=result.get("message"),
        )


def _entries(response: Any) -> list[Entry]:
    entries: list[Entry] = []
    for item in response or ():
        if item.get("type") != "searchResEntry":
            continue
        entries.append(entry_from_raw(str(item["dn"]), item.get("raw_attributes", {})))
    return entries


def _paged_cookie(result: dict[str, Any]) -> bytes | None:
    control = (result.get("controls") or {}).get(PAGED_RESULTS_OID)
    if not control:
        return None
    cookie = control.get("value", {}).get("cookie")
    return bytes(cookie) if cookie else None


class SessionPool:
    """Bound sessions shared by the worker threads that run ldap3 calls.

    A call takes an idle session or opens one. A session whose call raised is
    closed instead of returned, so the next call reconnects. When a reused session
    turns out to be closed by the server (an idle timeout, a restart), the call is
    run once more at once on a new session.
    """

    def __init__(
        self,
        settings: DirectorySettings,
        opener: Callable[[DirectorySettings], LdapSession] = LdapSession.open,
    ) -> None:
        self._settings = settings
        self._opener = opener
        self._idle: queue.SimpleQueue[LdapSession] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, operation: Callable[[LdapSession], T]) -> T:
        """Run `operation` on a session, in the calling thread."""
        session, reused = self._acquire()
        try:
            result = operation(session)
        except ldap_errors.LDAPCommunicationError:
            session.close()
            if not reused:
                raise
            logger.info(
                "LDAP connection was closed by the server; reconnecting url=%s",
                self._settings.url,
            )
            return self._run_on_new_session(operation)
        except BaseException:
            session.close()
            raise

        self._release(session)
        return result

    def close(self) -> None:
        """Close every idle session; sessions still in use close when released."""
        with self._lock:
            self._closed = True
        while True:
            try:
                session = self._idle.get_nowait()
            except queue.Empty:
                return
            session.close()

    def _run_on_new_session(self, operation: Callable[[LdapSession], T]) -> T:
        session = self._open()
        try:
            result = operation(session)
        except BaseException:
            session.close()
            raise
        self._release(session)
        return result

    def _acquire(self) -> tuple[LdapSession, bool]:
        while True:
            try:
                session = self._idle.get_nowait()
            except queue.Empty:
                return self._open(), False
            if not session.closed:
                return session, True
            session.close()

    def _open(self) -> LdapSession:
        session = self._opener(self._settings)
        logger.info(
            "LDAP connection opened url=%s bind_dn=%s",
            self._settings.url,
            self._settings.bind_dn or "anonymous",
        )
        return session

    def _release(self, session: LdapSession) -> None:
        with self._lock:
            if not self._closed:
                self._idle.put(session)
                return
        session.close()
