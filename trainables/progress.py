"""Stage messages for long steps (building the tiny base, the digit classifier, the token cache, generating,
scoring): ``[stage] what 120/600 (20%), 35 s, ETA 2m20s``, at most one line every ``every_seconds`` plus the last.
No Ray, no printing of its own: lines go to the ``log`` callable the caller passes (``print`` by default)."""

from __future__ import annotations

import time
from collections.abc import Callable

Log = Callable[[str], None]


def duration(seconds: float) -> str:
    """12 s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts ``total`` units of one stage; ``update(done, note)`` logs when a line is due (first, throttled, last).
    ``start``: the units done before this count began (a resumed run's steps): the ETA takes the rate of the units
    done since, ``done - start`` in the time elapsed since construction."""

    def __init__(
        self,
        stage: str,
        what: str,
        total: int,
        *,
        log: Log | None = print,
        every_seconds: float = 15.0,
        start: int = 0,
    ):
        self.stage, self.what, self.total, self.log, self.every = (
            stage,
            what,
            max(1, int(total)),
            log,
            every_seconds,
        )
        self.start = int(start)
        self.started = time.perf_counter()
        self.last_logged: float | None = None

    def update(self, done: int, note: str = "") -> None:
        if self.log is None:
            return
        now = time.perf_counter()
        due = self.last_logged is None or now - self.last_logged >= self.every or done >= self.total
        if not due:
            return
        self.last_logged = now
        elapsed = now - self.started
        since = done - self.start
        eta = (
            f", ETA {duration(elapsed / since * (self.total - done))}"
            if 0 < since and done < self.total
            else ""
        )
        suffix = f" {note}" if note else ""
        self.log(
            f"[{self.stage}] {self.what} {done}/{self.total} ({100 * done / self.total:.0f}%), {duration(elapsed)}{eta}{suffix}"
        )

    def message(self, text: str) -> None:
        if self.log is not None:
            self.log(f"[{self.stage}] {text}")
