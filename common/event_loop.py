"""The servers' event loop: uvloop when installed (as vLLM's API server), else asyncio's own.

Safe for the engine server since its engine core runs in another process: a faster loop no longer takes
GIL time from the engine (it did when the engine was a thread of the server, and uvloop was then slower).
"""

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(main) on uvloop if it is importable."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
