"""The event loop the servers run on: uvloop where it is installed (as vLLM's API server does; it halves
the loop's own cost per request and per streamed chunk), asyncio's own otherwise."""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine


def run(main: Coroutine) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
