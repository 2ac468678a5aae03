"""Names and small helpers shared by the test packages (fixtures live in conftest.py files)."""

TINY_MODEL_ID = "tiny-test-model"


class FakeClock:
    """Unix seconds that move only when a test says so, for leases, TTLs, parking and expiry."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
