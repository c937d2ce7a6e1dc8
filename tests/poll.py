"""Waiting in tests: poll a condition until it holds, or fail once a deadline passes.

The timeout bounds a wait that only a broken system reaches; it is no timing assertion (a slow machine
waits longer, it does not fail), so give it room. The error names what never happened. A condition may
raise to end the wait early: a process that exited, say, will never answer.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
INTERVAL_S = 0.02  # between two checks: short next to the waits here, long next to a cheap check


def _pause(check_took: float) -> float:
    """At least as long as the check took: a costly one (a kubectl run, an HTTP scrape) gets at most half a core."""
    return max(INTERVAL_S, check_took)


def _timed_out(what: str | Callable[[], str], timeout: float) -> TimeoutError:
    return TimeoutError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")


def until(condition: Callable[[], T], what: str | Callable[[], str], timeout: float = 30.0) -> T:
    """Call `condition` until it returns something truthy, and return that. `what` describes the awaited
    state for the error (a function: evaluated then, to show the last state seen)."""
    deadline = time.monotonic() + timeout
    while True:
        start = time.monotonic()
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout)
        time.sleep(_pause(time.monotonic() - start))


async def until_async(
    condition: Callable[[], T | Awaitable[T]], what: str | Callable[[], str], timeout: float = 30.0
) -> T:
    """`until` inside an event loop, which runs between checks; `condition` may return an awaitable (be a
    coroutine function)."""
    deadline = time.monotonic() + timeout
    while True:
        start = time.monotonic()
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(_pause(time.monotonic() - start))
