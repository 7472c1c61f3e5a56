"""`autopull demo`: the whole pipeline on bundled alerts and a bundled mail world.

It starts (or reuses) a local Kafka broker and the Microsoft 365 simulator, runs a
worker process, ingests every alert in examples/alerts/, waits until each copy the
plan pulls has a final outcome, and prints one row per copy. Broker and
simulator keep running for the next run, and `--stop` stops them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autopull.streams.ingest import RawSender, raw_alert, read_input
from autopull.streams.plan import plan_files
from autopull.streams.records import PULLED_STATUSES, Record
from autopull.streams.settings import Settings, load_settings
from autopull.streams.topics import ensure_topics
from autopull.streams.watch import IncidentWatcher, consumed_all

DEMO_KAFKA_PORT = int(os.environ.get("AUTOPULL_DEMO_KAFKA_PORT", "9092"))
DEMO_GRAPH_PORT = int(os.environ.get("AUTOPULL_DEMO_GRAPH_PORT", "8765"))


@dataclass(frozen=True)
class DemoPaths:
    """Files of the demo, relative to the repository root."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".cache" / "demo"

    @property
    def alerts(self) -> list[Path]:
        folder = self.root / "examples" / "alerts"
        return sorted([*folder.glob("*.json"), *folder.glob("*.xml")])

    @property
    def world(self) -> Path:
        return self.root / "examples" / "worlds" / "demo.json"

    @property
    def config(self) -> Path:
        return self.root / "examples" / "demo.yaml"


def repository_root() -> Path:
    """Return the checkout the package was installed from, or the current folder."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here, Path.cwd()):
        if (candidate / "dev" / "kafka.sh").is_file():
            return candidate
    raise SystemExit(
        "error: the demo needs the repository checkout (dev/kafka.sh and examples/); "
        "run it from the cloned repository."
    )


def run_demo(*, reset: bool, stop: bool, timeout: float) -> int:
    """Run the demo and return 0 when every expected copy was quarantined."""
    paths = DemoPaths(repository_root())
    console = Console(stderr=True)
    if stop or reset:
        _stop_services(paths, console, wipe=reset)
        if stop:
            return 0

    settings = _demo_settings(paths)
    _start_kafka(paths, console)
    _start_graph(paths, console)
    ensure_topics(settings)

    expected = _expected_pulls(paths, settings)
    console.print(
        f"Plan: {len(expected)} copies to pull from {len(paths.alerts)} alert files."
    )
    with _worker(paths, settings, console):
        _ingest(paths, settings, console)
        rows = _wait_for_outcomes(settings, expected, timeout, console)
    return _report(rows, expected, console)


def _demo_settings(paths: DemoPaths) -> Settings:
    """Return the demo's settings; the worker process inherits the same environment.

    Variables the user set win over examples/demo.yaml.
    """
    os.environ.setdefault("AUTOPULL_CONFIG", str(paths.config))
    os.environ.setdefault("AUTOPULL_KAFKA_BOOTSTRAP", f"127.0.0.1:{DEMO_KAFKA_PORT}")
    os.environ.setdefault("AUTOPULL_DATA_DIR", str(paths.state / "worker"))
    os.environ.setdefault("AUTOPULL_GRAPH__GRAPH_URL", f"{_graph_url()}/v1.0")
    os.environ.setdefault("AUTOPULL_GRAPH__AUTHORITY_URL", _graph_url())
    return load_settings()


def _run(command: list[str], console: Console, **env: str) -> None:
    result = subprocess.run(
        command, env=os.environ | env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        console.print(result.stdout + result.stderr)
        raise SystemExit(
            f"error: {' '.join(command)} failed with exit code {result.returncode}."
        )


def _start_kafka(paths: DemoPaths, console: Console) -> None:
    console.print(
        f"Starting or reusing the local Kafka broker on 127.0.0.1:{DEMO_KAFKA_PORT} ..."
    )
    _run(
        ["bash", str(paths.root / "dev" / "kafka.sh"), "start"],
        console,
        AUTOPULL_KAFKA_PORT=str(DEMO_KAFKA_PORT),
    )


def _graph_url() -> str:
    return f"http://127.0.0.1:{DEMO_GRAPH_PORT}"


def _graph_healthy() -> bool:
    try:
        return httpx.get(f"{_graph_url()}/_sim/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _simulator_pid(paths: DemoPaths) -> int | None:
    """Return the pid of the simulator this demo started, if it still runs."""
    pid_file = paths.state / "graph-sim.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


def _start_graph(paths: DemoPaths, console: Console) -> None:
    healthy = _graph_healthy()
    if healthy and _simulator_pid(paths) is not None:
        console.print(f"Reusing the Microsoft 365 simulator on {_graph_url()}.")
        return
    if healthy:
        raise SystemExit(
            f"error: a simulator that this demo did not start listens on "
            f"{_graph_url()}; stop it, or set AUTOPULL_DEMO_GRAPH_PORT to a free port."
        )

    paths.state.mkdir(parents=True, exist_ok=True)
    log = (paths.state / "graph-sim.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autopull.sim",
            "graph",
            "--world",
            str(paths.world),
            "--state",
            str(paths.state / "graph-state.json"),
            "--port",
            str(DEMO_GRAPH_PORT),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (paths.state / "graph-sim.pid").write_text(str(process.pid))
    deadline = time.monotonic() + 30
    while not _graph_healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(
                "error: the Microsoft 365 simulator did not start; see "
                f"{paths.state / 'graph-sim.log'}."
            )
        time.sleep(0.2)
    console.print(f"Started the Microsoft 365 simulator on {_graph_url()}.")


def _stop_services(paths: DemoPaths, console: Console, *, wipe: bool) -> None:
    pid = _simulator_pid(paths)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _simulator_pid(paths) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        console.print(f"Stopped the Microsoft 365 simulator (pid {pid}).")
    elif _graph_healthy():
        console.print(
            f"[yellow]A simulator this demo did not start listens on {_graph_url()}; "
            "it was left running.[/yellow]"
        )
    (paths.state / "graph-sim.pid").unlink(missing_ok=True)

    command = "reset" if wipe else "stop"
    _run(
        ["bash", str(paths.root / "dev" / "kafka.sh"), command],
        console,
        AUTOPULL_KAFKA_PORT=str(DEMO_KAFKA_PORT),
    )
    console.print(f"Stopped the demo's Kafka broker on 127.0.0.1:{DEMO_KAFKA_PORT}.")
    if wipe:
        (paths.state / "graph-state.json").unlink(missing_ok=True)
        shutil.rmtree(paths.state / "worker", ignore_errors=True)
        console.print("Wiped the broker data, the simulator state and the tables.")


def _expected_pulls(paths: DemoPaths, settings: Settings) -> set[tuple[str, str]]:
    policy = settings.pull_policy()
    decisions, errors = plan_files(
        [str(p) for p in paths.alerts], policy, max_bytes=settings.ingest_max_bytes
    )
    if errors:
        raise SystemExit(
            "error: the bundled alerts do not plan cleanly: "
            + "; ".join(str(error) for error in errors)
        )
    return {(d.mailbox, d.message_id) for d in decisions if d.action == "pull"}


@contextmanager
def _worker(paths: DemoPaths, settings: Settings, console: Console) -> Iterator[None]:
    env = dict(os.environ)
    log_path = paths.state / "worker.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "autopull.streams.cli", "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    console.print(f"Started a worker (pid {process.pid}); its log is {log_path}.")
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ingest(paths: DemoPaths, settings: Settings, console: Console) -> None:
    sender = RawSender(settings)
    for path in paths.alerts:
        sender.send(
            raw_alert(read_input(str(path), settings.ingest_max_bytes), None, "demo")
        )
    sender.flush()
    console.print(f"Ingested {len(paths.alerts)} alert files into {sender.topic}.")


def _wait_for_outcomes(
    settings: Settings, expected: set[tuple[str, str]], timeout: float, console: Console
) -> dict[tuple[str, str], Record]:
    watcher = IncidentWatcher(settings)
    deadline = time.monotonic() + timeout
    rows: dict[tuple[str, str], Record] = {}
    try:
        while time.monotonic() < deadline:
            watcher.poll(1.0)
            rows = watcher.pulls()
            final = {
                key for key in expected if key in rows and rows[key]["status"] in _FINAL
            }
            if final == expected and consumed_all(settings):
                return rows
        console.print("[red]Timed out waiting for outcomes.[/red]")
        return rows
    finally:
        watcher.close()


_FINAL = {
    "quarantined",
    "already_quarantined",
    "not_found",
    "failed",
    "skipped",
    "held",
}


def _report(
    rows: dict[tuple[str, str], Record],
    expected: set[tuple[str, str]],
    console: Console,
) -> int:
    table = Table(title="Copies pulled by the demo")
    for column in (
        "mailbox",
        "Message-ID",
        "status",
        "read",
        "original folder",
        "seconds",
    ):
        table.add_column(column)
    missing = 0
    for key in sorted(expected):
        row = rows.get(key)
        status = row["status"] if row else "no outcome"
        if status not in PULLED_STATUSES:
            missing += 1
        seconds = row.get("seconds_from_alert") if row else None
        table.add_row(
            escape(key[0]),
            escape(key[1]),
            status,
            "-"
            if not row or row.get("read") is None
            else ("read" if row["read"] else "unread"),
            escape((row.get("original_folder") if row else None) or "-"),
            f"{seconds:.1f}" if seconds is not None else "-",
        )
    out = Console()
    if not out.is_terminal:
        out.width = 200
    out.print(table)
    if missing:
        console.print(f"[red]{missing} expected copies were not quarantined.[/red]")
        return 1
    console.print(f"All {len(expected)} expected copies are quarantined.")
    return 0
