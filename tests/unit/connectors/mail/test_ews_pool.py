"""The EWS adapter's session pool under throttling, without a server.

exchangelib shrinks its pool after each ErrorServerBusy. With three sessions,
two of them in use and none free, a second shrink waits for the pool lock that
it holds itself. The adapter's protocol keeps its pool instead.
"""

from __future__ import annotations

import threading

import pytest
from exchangelib.errors import SessionPoolMinSizeReached
from exchangelib.protocol import CachingProtocol

from autopull.connectors.mail.ews import EwsPlatform, EwsSettings


@pytest.fixture
def platform() -> EwsPlatform:
    CachingProtocol.clear_cache()
    # Nothing is sent: creating sessions and shrinking the pool are local.
    return EwsPlatform(
        EwsSettings(
            service_endpoint="http://127.0.0.1:9/EWS/Exchange.asmx",
            username="svc@example.com",
            password="pool-test-password",
            quarantine_mailbox="quarantine@example.com",
            max_connections=3,
        )
    )


async def test_pool_kept_when_throttled(platform: EwsPlatform) -> None:
    protocol = platform._protocol
    sessions = [protocol.get_session() for _ in range(3)]
    protocol.release_session(sessions.pop())
    outcomes: list[BaseException | None] = []

    def shrink_twice() -> None:
        for _ in range(2):
            try:
                protocol.decrease_poolsize()
                outcomes.append(None)
            except SessionPoolMinSizeReached as error:
                outcomes.append(error)

    worker = threading.Thread(target=shrink_twice, daemon=True)
    worker.start()
    worker.join(timeout=5)
    finished = not worker.is_alive()
    size = protocol.session_pool_size
    for session in sessions:
        protocol.release_session(session)
    await platform.close()
    CachingProtocol.clear_cache()

    assert finished
    assert size == 3
    assert [type(outcome) for outcome in outcomes] == [SessionPoolMinSizeReached] * 2
