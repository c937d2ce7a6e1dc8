"""Keep a long-running process's start-up objects out of the garbage collector's way.

A process that has imported aiohttp and transformers (a tokenizer) or torch holds ~100,000 objects or more
that live as long as it does, and every collection of the oldest generation walks them all: 50-80 ms in
the gateway with a tokenizer loaded (measured), a pause that every request in flight waits out, at any
moment of a burst. gc.freeze() moves what exists now to a permanent generation that collections skip, as
vLLM does once its server is up. Called by a process's own entry point once it is ready (the gateway's, the
server's, the engine core's); never by code that may run inside someone else's process, such as a test's.
"""

import gc


def freeze_heap() -> None:
    """Collect what start-up left as garbage, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()
