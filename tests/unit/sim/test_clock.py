"""The virtual clock: an event loop whose time jumps to the next timer."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from autopull.sim.clock import ThreadWork, VirtualTimeLoop, run_virtual, serving_thread


def test_virtual_sleep_passes_at_once() -> None:
    async def sleep_ten_minutes() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(600)
        return started, loop.time()

    real_start = time.monotonic()
    started, finished = run_virtual(sleep_ten_minutes)

    assert finished - started == 600
    assert time.monotonic() - real_start < 5


def test_virtual_time_stands_still_while_busy() -> None:
    async def busy() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            pass
        return loop.time() - started

    assert run_virtual(busy) == 0


def test_virtual_timers_fire_in_order() -> None:
    async def race() -> list[str]:
        order: list[str] = []

        async def wake(name: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            order.append(name)

        await asyncio.gather(wake("late", 30), wake("early", 1), wake("middle", 10))
        return order

    assert run_virtual(race) == ["early", "middle", "late"]


def test_virtual_loop_reads_sockets() -> None:
    async def echo() -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()

        async def reply(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            data = await reader.readline()
            await asyncio.sleep(2)
            writer.write(data)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(reply, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        answer = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()
        return answer, loop.time() - started

    answer, seconds = run_virtual(echo)

    assert answer == b"ping\n"
    assert seconds == 2


def test_thread_work_holds_the_clock() -> None:
    async def sleep_in_thread() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = asyncio.ensure_future(asyncio.sleep(1))
        await loop.run_in_executor(None, time.sleep, 0.2)
        elapsed_during_job = loop.time() - started
        await timer
        return elapsed_during_job

    assert run_virtual(sleep_in_thread) == 0


def test_clock_jumps_while_threads_wait_on_server() -> None:
    async def serve_threads() -> tuple[list[bytes], float]:
        loop = asyncio.get_running_loop()

        async def reply(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            data = await reader.readline()
            with serving_thread():
                await asyncio.sleep(5)
            writer.write(data)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(reply, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def ask(text: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(text + b"\n")
                return connection.makefile("rb").readline()

        started = loop.time()
        # Two threads for four requests: two rounds of the server's 5 s.
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = await asyncio.gather(
                *(loop.run_in_executor(pool, ask, b"%d" % n) for n in range(4))
            )
        elapsed = loop.time() - started
        server.close()
        await server.wait_closed()
        return answers, elapsed

    answers, elapsed = run_virtual(serve_threads)

    assert answers == [b"0\n", b"1\n", b"2\n", b"3\n"]
    assert elapsed == 10


def test_thread_work_counts_one_job_per_pool_thread() -> None:
    work = ThreadWork()
    pool = ThreadPoolExecutor(max_workers=2)
    for _ in range(5):
        work.submit(pool)
    work.served = 1

    assert work.running() == 2
    assert work.busy()
    work.served = 2
    assert not work.busy()
    for _ in range(4):
        work.finish(pool)
    assert work.running() == 1
    work.finish(pool)
    assert work.submitted == {}
    pool.shutdown()


def test_held_clock_waits_for_thread() -> None:
    async def thread_then_timer() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        loop.may_advance = lambda: loop.executor_jobs == 0
        started = loop.time()
        timer = asyncio.ensure_future(asyncio.sleep(300))
        # The thread works for longer than the loop's grace, with a timer pending.
        await loop.run_in_executor(None, time.sleep, 0.2)
        after_thread = loop.time() - started
        await timer
        return after_thread, loop.time() - started

    after_thread, after_timer = run_virtual(thread_then_timer)

    assert after_thread == 0
    assert after_timer == 300


def test_executor_jobs_counted_until_done() -> None:
    async def count() -> list[int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        seen = [loop.executor_jobs]
        jobs = [loop.run_in_executor(None, time.sleep, 0.01) for _ in range(3)]
        seen.append(loop.executor_jobs)
        await asyncio.gather(*jobs)
        seen.append(loop.executor_jobs)
        return seen

    assert run_virtual(count) == [0, 3, 0]
