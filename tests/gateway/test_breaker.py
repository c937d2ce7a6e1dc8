"""The circuit breaker as a pure state machine (an explicit clock)."""

from __future__ import annotations

from nanoserve.gateway.breaker import Breaker


def test_opens_after_threshold_consecutive_failures_only():
    b = Breaker(threshold=3, cooldown=1.0)
    b.failure(now=0)
    b.failure(now=0)
    b.success()  # not consecutive
    b.failure(now=0)
    b.failure(now=0)
    assert b.state(now=0) == "closed" and b.available(now=0)
    b.failure(now=0)
    assert b.state(now=0.5) == "open" and not b.available(now=0.5)


def test_half_open_lets_exactly_one_trial_through():
    b = Breaker(threshold=1, cooldown=1.0)
    b.failure(now=0)
    assert b.state(now=1.0) == "half_open" and b.available(now=1.0)
    assert b.begin(now=1.0) is True
    assert not b.available(now=1.0)  # a second request waits for the trial's verdict
    b.success()
    assert b.state(now=1.0) == "closed" and b.available(now=1.0) and b.begin(now=1.0) is False


def test_failed_trials_double_the_cooldown_up_to_the_cap():
    b = Breaker(threshold=2, cooldown=1.0, max_cooldown=5.0)
    b.failure(now=0)
    b.failure(now=0)
    now, cooldowns = 0.0, []
    for _ in range(5):
        cooldowns.append(b.open_until - now)
        now = b.open_until
        assert b.begin(now=now)
        b.failure(now=now)  # one failed trial reopens it: no new count of `threshold`
    assert cooldowns == [1.0, 2.0, 4.0, 5.0, 5.0]
    b.success()
    b.failure(now=now)
    assert b.state(now=now) == "closed"  # back to counting from zero


def test_failures_while_open_do_not_extend_it_and_release_frees_the_trial():
    b = Breaker(threshold=1, cooldown=1.0)
    b.failure(now=0)
    b.failure(now=0.5)  # a request sent before it opened
    assert b.open_until == 1.0
    assert b.begin(now=1.0)
    b.release()  # the trial's client left: no verdict
    assert b.available(now=1.0)


def test_threshold_zero_never_opens():
    b = Breaker(threshold=0)
    for _ in range(100):
        b.failure(now=0)
    assert b.available(now=0)
