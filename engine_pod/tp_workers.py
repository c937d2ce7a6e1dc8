"""Rank 0's view of its tensor-parallel workers (ranks 1..N-1): spawn them, notice at once when one dies,
stop them.

A dead worker must not leave rank 0 waiting: for a `read` semaphore (up to WORKER_TIMEOUT_S), in the
rendezvous (the process-group timeout: minutes) or in a collective. gloo raises in a collective as soon
as the peer's sockets close ("Connection closed by peer"); every other wait here is a short-timeout loop
that checks the workers' exit codes, so rank 0 raises WorkerDied, naming the worker, within POLL_S.
Not covered: NCCL does not raise when a peer dies (rank 0 may wait in a CUDA sync until NCCL's own
watchdog aborts it), and a worker that dies inside the rendezvous itself costs the group's timeout.
"""

import logging
import multiprocessing as mp
import os
import signal
import time
import uuid
from multiprocessing.connection import wait
from multiprocessing.context import ForkServerContext
from multiprocessing.shared_memory import SharedMemory

from nanoserve.common.ports import PortReservation
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.tp_commands import TPLink

log = logging.getLogger("nanoserve.engine")

POLL_S = 0.2  # how often a waiting rank 0 checks that its workers live
WORKER_TIMEOUT_S = 600  # a live worker busy this long with one step is stuck (first steps compile kernels)
START_HINT = (
    'If you create LLM(tensor_parallel_size>1) in a script, put it under `if __name__ == "__main__":` '
    "(each worker is a new process that imports the main module again); the worker's own error, "
    "if any, is printed above"
)


class WorkerDied(RuntimeError):
    """A tensor-parallel worker has exited: this engine cannot run another step."""


def describe_exit(code: int) -> str:
    """multiprocessing's exit code as words: negative codes are the signal that killed the process."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def worker_context() -> ForkServerContext:
    """Workers fork from a forkserver that has imported torch and the model code once per process (a
    fresh interpreter, like spawn: no CUDA state or threads are inherited), so that a worker starts in
    ~0.1 s instead of importing torch again (~1.5 s)."""
    ctx = mp.get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    ctx.set_forkserver_preload(["nanoserve.engine_pod.model_runner"])
    return ctx


class Workers:
    """The worker processes, the shared-memory segment rank 0 writes commands into, and the events."""

    def __init__(self, config: Config):
        # Unique names: two engines on one host must not share a segment or a port.
        name = f"nanoserve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        blocks_per_seq = -(-config.max_model_len // config.kvcache_block_size)
        size = 2**20 + 16 * (4 * config.max_num_batched_tokens + config.max_num_seqs * (blocks_per_seq + 4))
        ctx = worker_context()
        ranks = range(1, config.tensor_parallel_size)
        # The rendezvous port, held until the workers stop: no other process takes it before rank 0 binds it.
        self.port = PortReservation()
        # A worker releases its `read` semaphore once it runs (see worker_main): the segment is free for a command.
        self.link = TPLink(
            port=self.port.port,
            shm_name=name,
            posted=[ctx.Semaphore(0) for _ in ranks],
            read=[ctx.Semaphore(0) for _ in ranks],
        )
        self.procs: list = []
        self.shm: SharedMemory | None = SharedMemory(name=name, create=True, size=size)
        # Workers must not put the current directory on sys.path: our operator/ folder shadows the stdlib's.
        os.environ.setdefault("PYTHONSAFEPATH", "1")
        from nanoserve.engine_pod.model_runner import worker_main  # torch: not in the server, which only reads exits

        try:
            for rank in ranks:
                proc = ctx.Process(
                    target=worker_main, args=(config, rank, self.link), daemon=True, name=f"nanoserve-tp-worker-{rank}"
                )
                proc.start()
                self.procs.append(proc)
        except BaseException:  # e.g. multiprocessing's "bootstrapping phase" error in an unguarded script
            self.stop(timeout=0)
            raise
        log.info("tensor-parallel workers: pids %s", ", ".join(str(p.pid) for p in self.procs))

    def dead(self) -> str | None:
        """Which worker has exited, and how; None while all live."""
        for rank, proc in enumerate(self.procs, 1):
            if proc.exitcode is not None:
                return f"tensor-parallel worker {rank} (pid {proc.pid}) died with {describe_exit(proc.exitcode)}"
        return None

    def check(self) -> None:
        if (why := self.dead()) is not None:
            raise WorkerDied(why)

    def wait(self, sem, rank: int, timeout: float = WORKER_TIMEOUT_S) -> None:
        """Acquire a worker's semaphore; raise WorkerDied as soon as any worker exits."""
        deadline = time.monotonic() + timeout
        while not sem.acquire(timeout=POLL_S):
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel worker {rank} did not take a command for {timeout:.0f} s: it is stuck"
                )

    def wait_started(self) -> None:
        """Until every worker runs worker_main. One that dies first (typically while it imports the main module
        again) fails the engine at once, not after the rendezvous' timeout."""
        try:
            for rank, read in enumerate(self.link.read, 1):
                self.wait(read, rank)
                read.release()  # still free for the first command
        except WorkerDied as e:
            raise WorkerDied(f"{e}: the worker exited during start-up. {START_HINT}") from None

    def explain(self, error: BaseException, grace: float = 1.0) -> None:
        """After `error` on rank 0 (gloo's "Connection closed by peer", say): raise WorkerDied naming the worker
        if one has exited. Its sockets close a moment before its exit code is known: join it for the code."""
        if isinstance(error, WorkerDied):
            return
        gone = wait([p.sentinel for p in self.procs], timeout=grace)
        for proc in self.procs:
            if proc.sentinel in gone:
                proc.join(timeout=grace)
        if (why := self.dead()) is not None:
            raise WorkerDied(why) from error

    def stop(self, timeout: float = 30) -> None:
        """Join the workers (they leave after the "exit" command), killing those still there after `timeout`."""
        for proc in self.procs:
            proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None
        self.port.close()
