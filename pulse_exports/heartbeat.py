"""A background heartbeat for a running export, so a lost worker is noticed even while the
source query is still planning or the first batch has not arrived."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds on a daemon thread while the block runs.

    ``beat`` returns False once the job is no longer this run's; ``lost`` then turns True and
    the step stops at its next progress report. A failing beat (database hiccup) is kept in
    ``last_error`` and retried at the next interval: progress writes fail the step if it lasts.
    """

    def __init__(self, beat: Callable[[], bool], interval: float) -> None:
        self._beat = beat
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pulse-heartbeat", daemon=True)
        self.lost = False
        self.last_error: Exception | None = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._beat() is False:
                    self.lost = True
            except Exception as exc:  # kept for the step to report; retried at the next beat
                self.last_error = exc

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)
