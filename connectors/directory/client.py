"""The asynchronous directory client the pipeline uses.

ldap3 blocks, so every lookup runs in a thread of a private pool, with
`pool_size` threads and at most as many LDAP connections. Results are cached for
`cache_ttl_seconds`, and addresses that were not found for
`negative_cache_ttl_seconds`, in memory unless another `DirectoryCache` is given.
A lookup that meets a down or slow server is retried with exponential backoff;
after `max_attempts` it raises TransientError.
Bad credentials and other configuration errors raise PermanentError at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import TracebackType
from typing import TypeVar
from urllib.parse import urlsplit

from ldap3.core.exceptions import LDAPException
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from autopull.connectors.errors import TransientError

from .cache import MISSING, DirectoryCache, MemoryCache
from .ldap import LdapSession, SessionPool, map_ldap_error
from .lookups import expand_address, find_person
from .models import Expansion, Person
from .parse import normalize_address
from .settings import DirectorySettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class Directory:
    """Resolves recipients and expands distribution lists in an LDAP directory.

    Use it as an async context manager, or call `close` when done, so the worker
    threads and connections end. Results go to `cache`, by default a `MemoryCache`
    of `cache_max_entries` per kind on `clock`.
    """

    def __init__(
        self,
        settings: DirectorySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        opener: Callable[[DirectorySettings], LdapSession] = LdapSession.open,
        cache: DirectoryCache | None = None,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._pool = SessionPool(settings, opener)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.pool_size, thread_name_prefix="autopull-ldap"
        )
        self._cache = cache or MemoryCache(settings.cache_max_entries, clock)
        self._closed = False
        _warn_if_password_unprotected(settings)

    async def resolve(self, address: str) -> Person | None:
        """Return the user who receives mail for `address`, or None if no user does.

        `address` may be the primary address or any `smtp:` alias, in any case.
        """
        normalized = normalize_address(address)
        if normalized is None:
            return None
        cached = self._cache.get_person(normalized)
        if cached is not MISSING:
            return cached
        # A list is not a user. Its expansion is cached for cache_ttl_seconds, which is
        # usually longer than the negative TTL of its unknown person.
        expansion = self._cache.get_expansion(normalized)
        if expansion is not MISSING and expansion.kind == "list":
            return None

        operation = partial(find_person, settings=self._settings, address=normalized)
        person = await self._call("resolve", normalized, operation)
        logger.debug(
            "Directory resolved address=%s mailbox=%s",
            normalized,
            person.mailbox if person else None,
        )
        ttl = self._settings.cache_ttl_seconds
        if person is None:
            ttl = self._settings.negative_cache_ttl_seconds
        self._cache.put_person(normalized, person, ttl)
        return person

    async def expand(self, address: str) -> Expansion:
        """Return the mailboxes behind `address`, nested lists included.

        A list reaching more than `max_list_members` mailboxes comes back with
        `too_large` set and only the first members.
        """
        normalized = normalize_address(address)
        if normalized is None:
            return Expansion(address=address, kind="unknown")
        cached = self._cache.get_expansion(normalized)
        if cached is not MISSING:
            return cached

        operation = partial(expand_address, settings=self._settings, address=normalized)
        expansion = await self._call("expand", normalized, operation)
        logger.debug(
            "Directory expanded address=%s kind=%s members=%d unresolved=%d",
            normalized,
            expansion.kind,
            len(expansion.members),
            len(expansion.unresolved),
        )
        ttl = self._settings.cache_ttl_seconds
        if expansion.kind == "unknown":
            ttl = self._settings.negative_cache_ttl_seconds
        self._cache.put_expansion(normalized, expansion, ttl)
        if expansion.too_large:
            logger.warning(
                "List has more than max_list_members=%d mailboxes address=%s",
                self._settings.max_list_members,
                normalized,
            )
        return expansion

    def clear_cache(self) -> None:
        """Forget every cached result, so the next lookups search the server."""
        self._cache.clear()

    async def close(self) -> None:
        """Wait for running lookups, then close the threads and connections."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._pool.close()
        logger.info("Directory client closed url=%s", self._settings.url)

    async def __aenter__(self) -> Directory:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self, action: str, address: str, operation: Callable[[LdapSession], T]
    ) -> T:
        """Run `operation` in a worker thread, retrying transient failures."""
        if self._closed:
            raise RuntimeError(
                f"The directory client for {self._settings.url} is closed; create a "
                "new Directory to look up addresses."
            )
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self._settings.max_attempts),
            wait=wait_exponential(
                multiplier=self._settings.retry_backoff_seconds,
                max=self._settings.max_retry_wait_seconds,
            ),
            sleep=self._sleep,
            before_sleep=partial(_log_retry, action, address),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                result = await self._run_in_thread(operation)
        return result

    async def _run_in_thread(self, operation: Callable[[LdapSession], T]) -> T:
        """Run one attempt; the only place where ldap3 errors become ours."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._pool.run, operation)
        except (LDAPException, OSError) as error:
            raise map_ldap_error(error, self._settings.url) from error


def _log_retry(action: str, address: str, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning(
        "Directory lookup failed; retrying action=%s address=%s attempt=%d "
        "wait_seconds=%.2f error=%s",
        action,
        address,
        state.attempt_number,
        wait,
        error,
    )


def _warn_if_password_unprotected(settings: DirectorySettings) -> None:
    parts = urlsplit(settings.url)
    if settings.password is None or parts.scheme.lower() == "ldaps":
        return
    if settings.start_tls or (parts.hostname or "") in LOOPBACK_HOSTS:
        return
    logger.warning(
        "The bind password is sent unencrypted; use an ldaps:// URL or set "
        "start_tls url=%s bind_dn=%s",
        settings.url,
        settings.bind_dn,
    )
