"""Fixtures of the directory connector's unit tests."""

from __future__ import annotations

import pytest
from directory_fakes import MockDirectory, build_corp


@pytest.fixture
def corp() -> MockDirectory:
    """A mock directory with nested lists, a cycle, a VIP group and odd members."""
    return build_corp()
