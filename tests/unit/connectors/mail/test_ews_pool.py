"""The EWS adapter's session pool under throttling, without a server.

exchangelib shrinks its pool after each ErrorServerBusy. With three sessions,
two of them in use and none free, a second shrink waits for the pool lock that
it holds itself. The adapter's protocol keeps its pool instead, and gives no
session to a request of a mailbox that waits out a back-off.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from exchangelib.errors import ErrorServerBusy, SessionPoolMinSizeReached
from exchangelib.protocol import CachingProtocol

from autopull.connectors.mail.ews import EwsPlatform, EwsSettings, _Gate, _run_step


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


async def test_paused_mailbox_gets_no_session(platform: EwsPlatform) -> None:
    loop = asyncio.get_running_loop()
    gate = _Gate(asyncio.Semaphore(1), loop.time)
    gate.pause(5.0)

    def next_request() -> object:
        return platform._protocol.get_session()

    with pytest.raises(ErrorServerBusy) as caught:
        await loop.run_in_executor(None, _run_step, gate, next_request)
    await platform.close()
    CachingProtocol.clear_cache()

    assert caught.value.back_off is not None
    assert 4.0 < caught.value.back_off <= 5.0
