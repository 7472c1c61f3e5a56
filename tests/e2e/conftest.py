"""Fixtures for end-to-end runs: the Graph simulator and worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import BaseModel, SecretStr

from autopull.streams.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORLD = REPO_ROOT / "examples" / "worlds" / "demo.json"
DEMO_CONFIG = REPO_ROOT / "examples" / "demo.yaml"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GraphSim:
    """A Graph simulator process over a copy of the demo world."""

    def __init__(self, url: str, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.process = process

    def messages(self, mailbox: str) -> list[dict[str, object]]:
        """Return every message of `mailbox` with its folder, from the admin API."""
        response = httpx.get(f"{self.url}/_sim/mailboxes/{mailbox}/messages")
        response.raise_for_status()
        result: list[dict[str, object]] = response.json()
        return result


@pytest.fixture
def graph_world() -> Path:
    """Return the scenario file of the mail world; a test module may override it."""
    return DEMO_WORLD


@pytest.fixture
def graph_latency_ms() -> float:
    """Return the latency the simulator adds to each request; 0 unless overridden."""
    return 0.0


@pytest.fixture
def graph_sim(
    tmp_path: Path, graph_world: Path, graph_latency_ms: float
) -> Iterator[GraphSim]:
    """Start the Graph simulator on a free port; fail when it does not come up."""
    port = free_port()
    log = (tmp_path / "graph-sim.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autopull.sim",
            "graph",
            "--world",
            str(graph_world),
            "--state",
            str(tmp_path / "graph-state.json"),
            "--port",
            str(port),
            "--latency-ms",
            str(graph_latency_ms),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/_sim/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                "The Graph simulator did not start: "
                + (tmp_path / "graph-sim.log").read_text(),
                pytrace=False,
            )
        time.sleep(0.1)
    yield GraphSim(url, process)
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
def pipeline_settings(
    kafka_bootstrap: str, topic_prefix: str, graph_sim: GraphSim, tmp_path: Path
) -> Settings:
    """Settings of a test pipeline on its own topics, against the simulator."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    graph = dict(demo["graph"])
    graph["graph_url"] = f"{graph_sim.url}/v1.0"
    graph["authority_url"] = graph_sim.url
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        topic_partitions=4,
        store="memory://",
        data_dir=tmp_path / "worker",
        web_enabled=False,
        session_timeout_seconds=6,
        pull_max_wait_seconds=5,
        policy=demo["policy"],
        graph=graph,
    )


def _plain(value: object) -> object:
    """Return `value` with secrets unwrapped and paths as text, ready for JSON."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _env_value(value: object) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def settings_environment(settings: Settings) -> dict[str, str]:
    """Return the AUTOPULL_* variables that reproduce `settings` in a worker."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, BaseModel):
            for inner in type(value).model_fields:
                inner_value = getattr(value, inner)
                if inner_value is not None:
                    key = f"AUTOPULL_{name.upper()}__{inner.upper()}"
                    env[key] = _env_value(_plain(_dump(inner_value)))
            continue
        env[f"AUTOPULL_{name.upper()}"] = _env_value(_plain(_dump(value)))
    return env


def _dump(value: object) -> object:
    if isinstance(value, BaseModel):
        return {name: _dump(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {key: _dump(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_dump(item) for item in value]
    return value


WorkerFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(
    pipeline_settings: Settings, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Return a function that starts a worker process; all are stopped at the end."""
    processes: list[subprocess.Popen[bytes]] = []
    environment = os.environ | settings_environment(pipeline_settings)
    environment.pop("AUTOPULL_CONFIG", None)

    def start(settings: Settings | None = None) -> subprocess.Popen[bytes]:
        env = environment
        if settings is not None:
            env = os.environ | settings_environment(settings)
            env.pop("AUTOPULL_CONFIG", None)
        log = (tmp_path / f"worker-{len(processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "autopull.streams.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def start_api_worker(tmp_path: Path) -> Iterator[Callable[[Settings], None]]:
    """Return a function that starts a worker with `settings`; all stop at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings) -> None:
        environment = os.environ | settings_environment(settings)
        environment.pop("AUTOPULL_CONFIG", None)
        log = (tmp_path / f"api-worker-{len(processes)}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "autopull.streams.cli", "worker"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def worker_environment() -> Callable[[Settings], dict[str, str]]:
    """Return the function that turns settings into a worker's AUTOPULL_* variables."""
    return settings_environment


@pytest.fixture(scope="session")
def pick_port() -> Callable[[], int]:
    """Return the function that picks a free TCP port on 127.0.0.1."""
    return free_port
