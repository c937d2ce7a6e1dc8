"""The server reads the engine core's pipe whole messages at a time, whatever the event loop does to the
pipe: on uvloop (the servers' loop) a message that arrives in pieces once read as a dead engine."""

import asyncio
import os
import pickle
import struct
import threading
import time

import uvloop
from poll import until_async

from nanoserve.engine_pod.async_engine import AsyncEngine
from nanoserve.engine_pod.engine_core import EngineCounts, StepOutput, portable
from nanoserve.engine_pod.metrics import EngineMetrics


def test_a_step_message_written_in_pieces_arrives_whole_on_uvloop():
    engine = AsyncEngine("unused", {}, "m")  # its process is never started here
    engine.metrics = EngineMetrics("m")
    rows = [(i, 1000 + i, None, 0) for i in range(20_000)]  # far beyond a pipe's atomic write
    payload = pickle.dumps(("step", StepOutput(0.0, 1.0, [], rows, EngineCounts(0, 5, 0.5, 0), 0, 0, 0, len(rows))))
    wire = struct.pack("!i", len(payload)) + payload  # multiprocessing's framing: length, then the bytes

    async def main():
        engine.loop = asyncio.get_running_loop()
        engine._ready, engine.failed = engine.loop.create_future(), asyncio.Event()
        engine._receiver.start()
        fd = engine._out_w.fileno()

        def write_slowly():
            for start in range(0, len(wire), 50_000):
                os.write(fd, wire[start : start + 50_000])
                time.sleep(0.01)  # the reader sees the first pieces long before the rest

        writer = threading.Thread(target=write_slowly)
        writer.start()
        await until_async(lambda: engine.counts.running == 5 or engine.error is not None, "the step message, whole")
        writer.join()
        return engine.error, engine.counts

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        error, counts = runner.run(main())
    assert error is None and counts.running == 5
    engine._stopping = True
    engine._out_w.close()  # EOF ends the reader thread
    engine._receiver.join(5)
    assert not engine._receiver.is_alive()


def test_only_errors_the_torch_free_server_can_unpickle_cross_as_themselves():
    """The server keeps torch out: an engine error of a class it cannot import (torch's, or a module that
    imports torch) travels as a RuntimeError naming it; builtin errors and errors.py's as they are."""
    import torch

    from nanoserve.engine_pod.errors import GrammarProcessDied, InvalidRequestError
    from nanoserve.engine_pod.tp_workers import WorkerDied

    oom = portable(torch.OutOfMemoryError("CUDA out of memory"))
    assert type(oom) is RuntimeError and str(oom) == "OutOfMemoryError: CUDA out of memory"
    assert type(portable(WorkerDied("worker 1 died"))) is RuntimeError
    for kept in (GrammarProcessDied("gone"), InvalidRequestError("bad", "prompt"), ValueError("v")):
        assert portable(kept) is kept
