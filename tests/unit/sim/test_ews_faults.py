"""The EWS simulator's fault rules: counts, shares of requests and time windows."""

from __future__ import annotations

import pytest

from autopull.sim.ews import FaultInjector


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_fault_probability_hits_share() -> None:
    faults = FaultInjector(Clock(), seed=7)
    faults.add({"kind": "server_busy", "probability": 0.4, "count": 10**6})

    hits = sum(
        faults.take("FindItem", "a@example.com") is not None for _ in range(5000)
    )

    assert 1800 <= hits <= 2200


def test_fault_probability_same_with_seed() -> None:
    runs = []
    for _ in range(2):
        faults = FaultInjector(Clock(), seed=3)
        faults.add({"kind": "unavailable", "probability": 0.5, "count": 100})
        runs.append([faults.take("GetItem", None) is not None for _ in range(50)])

    assert runs[0] == runs[1]


def test_fault_until_ends_storm() -> None:
    clock = Clock()
    faults = FaultInjector(clock)
    faults.add({"kind": "server_busy", "until": 60.0, "count": 10})

    clock.now = 59.9
    during = faults.take("FindItem", "a@example.com")
    clock.now = 60.0
    after = faults.take("FindItem", "a@example.com")

    assert during is not None
    assert after is None
    assert faults.rules[0].count == 9


@pytest.mark.parametrize("probability", [0, -0.1, 1.5])
def test_fault_probability_out_of_range(probability: float) -> None:
    faults = FaultInjector(Clock())

    with pytest.raises(ValueError, match="probability"):
        faults.add({"kind": "server_busy", "probability": probability})
