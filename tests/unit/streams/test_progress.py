import io

from autopull.streams.progress import ProgressReporter, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_off_terminal() -> None:
    out = io.StringIO()
    with progress("Restoring copies", 4, out=out) as shown:
        shown.advance()
        shown.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "Restoring copies: 0/4 (0%)"
    assert lines[-1] == "Restoring copies: 2/4 (50%)"
    assert "\x1b[" not in out.getvalue()


def test_plain_lines_rate_limited() -> None:
    out = io.StringIO()
    clock = FakeClock()
    shown = ProgressReporter(
        "Pulls", 100, out=out, terminal=False, interval=5.0, clock=clock
    )
    shown.start()
    for count in range(1, 50):
        clock.now += 0.1
        shown.update(count)
    clock.now += 5.0
    shown.update(50)
    shown.stop()
    assert out.getvalue().splitlines() == ["Pulls: 0/100 (0%)", "Pulls: 50/100 (50%)"]


def test_plain_last_state_always_printed() -> None:
    out = io.StringIO()
    clock = FakeClock()
    shown = ProgressReporter("Pulls", 3, out=out, terminal=False, clock=clock)
    shown.start()
    shown.update(3)
    shown.stop()
    assert out.getvalue().splitlines()[-1] == "Pulls: 3/3 (100%)"


def test_plain_total_zero_reads_complete() -> None:
    out = io.StringIO()
    with progress("Nothing", 0, out=out):
        pass
    assert out.getvalue().splitlines() == ["Nothing: 0/0 (100%)"]


def test_terminal_draws_bar() -> None:
    out = io.StringIO()
    with progress("Restoring copies", 2, out=out, terminal=True) as shown:
        shown.update(2)
    text = out.getvalue()
    assert "Restoring copies" in text
    assert "2/2" in text
