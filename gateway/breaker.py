"""A per-engine circuit breaker: stop sending requests to an engine that keeps failing them.

Health probes alone are not enough: an engine can answer /ready with 200 and still hang, garble or 5xx
every request. After `threshold` consecutive failed requests the breaker opens: the engine gets no traffic
for a cooldown. Then it is half-open: exactly one trial request goes through; success closes the breaker,
failure opens it again with the cooldown doubled (capped at `max_cooldown`). Probes do not close it: only
a request the engine actually served does.
"""

from __future__ import annotations

import time


class Breaker:
    def __init__(self, threshold: int = 5, cooldown: float = 2.0, max_cooldown: float = 60.0) -> None:
        self.threshold = threshold  # <= 0: never opens
        self.cooldown = cooldown  # after the first trip; doubled per failed trial
        self.max_cooldown = max_cooldown
        self.failures = 0  # consecutive failed requests while closed
        self.trips = 0  # consecutive openings (0: closed)
        self.open_until = 0.0  # time.monotonic() when the cooldown ends
        self.trial = False  # the half-open trial request is in flight

    def state(self, now: float | None = None) -> str:
        if self.trips == 0:
            return "closed"
        now = time.monotonic() if now is None else now
        return "open" if now < self.open_until else "half_open"

    def available(self, now: float | None = None) -> bool:
        """May a request be routed here now? Closed, or half-open with no trial running yet."""
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self.trial)

    def begin(self, now: float | None = None) -> bool:
        """A request is sent; True when it is the half-open trial (end it with success, failure or release)."""
        if self.state(now) == "half_open":
            self.trial = True
            return True
        return False

    def success(self) -> None:
        self.failures = self.trips = 0
        self.trial = False

    def failure(self, now: float | None = None) -> None:
        if self.threshold <= 0:
            return
        now = time.monotonic() if now is None else now
        state = self.state(now)
        if state == "open":
            return  # a request sent before the breaker opened: already counted against the engine
        if state == "half_open":
            self.trial = False
            self._open(now)  # the trial failed: wait longer
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self._open(now)

    def release(self) -> None:
        """The trial ended without a verdict (e.g. the client left): let another request try."""
        self.trial = False

    def _open(self, now: float) -> None:
        self.trips += 1
        self.failures = 0
        self.open_until = now + min(self.max_cooldown, self.cooldown * 2 ** (self.trips - 1))
