"""Fixtures that run private OpenLDAP slapd instances through dev/slapd.sh.

Each instance has its own configuration and database in a temporary folder and
listens on a free port of 127.0.0.1. The test directory is dev/slapd/directory.ldif.
A slapd that cannot start fails the test with its output. Install slapd first
with `bash dev/slapd.sh install`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SLAPD_SCRIPT = REPO_ROOT / "dev" / "slapd.sh"
SLAPD_SCRIPT_TIMEOUT_S = 60


@dataclass(frozen=True)
class SlapdInstance:
    """One slapd started by dev/slapd.sh, with its port and data folder.

    `base_dn`, `bind_dn` and `password` are those of dev/slapd/directory.ldif.
    """

    port: int
    data_dir: Path
    base_dn: str = "dc=autopull,dc=test"
    bind_dn: str = "cn=reader,ou=services,dc=autopull,dc=test"
    password: str = "reader-secret"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Start slapd, creating and loading the directory on the first start."""
        self._run("start")

    def stop(self) -> None:
        """Stop slapd and wait until it has exited."""
        self._run("stop")

    def _run(self, command: str) -> None:
        env = {
            **os.environ,
            "AUTOPULL_SLAPD_PORT": str(self.port),
            "AUTOPULL_SLAPD_DATA": str(self.data_dir),
        }
        # The tests expect the entries of dev/slapd/directory.ldif.
        env.pop("AUTOPULL_SLAPD_LDIF", None)
        try:
            result = subprocess.run(
                ["bash", str(SLAPD_SCRIPT), command],
                env=env,
                capture_output=True,
                text=True,
                timeout=SLAPD_SCRIPT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"dev/slapd.sh {command} timed out after {SLAPD_SCRIPT_TIMEOUT_S}s "
                f"for port {self.port}:\n{exc.stdout or ''}{exc.stderr or ''}",
                pytrace=False,
            )
        if result.returncode != 0:
            pytest.fail(
                f"dev/slapd.sh {command} failed with exit code {result.returncode} "
                f"for port {self.port} (data {self.data_dir}):\n"
                f"{result.stdout}{result.stderr}",
                pytrace=False,
            )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no process listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlapdInstance]:
    """A slapd shared by the session's tests, which must not stop it."""
    instance = SlapdInstance(free_port(), tmp_path_factory.mktemp("slapd"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[SlapdInstance]:
    """A slapd for one test, which may stop and restart it."""
    instance = SlapdInstance(free_port(), tmp_path / "slapd")
    instance.start()
    yield instance
    instance.stop()
