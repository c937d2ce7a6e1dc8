"""How rank 0 hands each command to its tensor-parallel workers: pickled into one shared-memory segment,
announced by a `posted` semaphore per worker, acknowledged by a `read` one.

NCCL collectives return before the peers join them, so rank 0 can run ahead of its workers; it writes the
next command only once every worker has acknowledged reading the last one, else it could overwrite a
command unread. Semaphores, not Events: Event.set() waits for every waiter to wake, so a worker killed
while it waits would hang rank 0.
"""

import multiprocessing as mp
import pickle
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

LEADER_CHECK_S = 1.0  # how often an idle worker checks that rank 0 still lives


@dataclass
class TPLink:
    """A free TCP port for the process group, the shm segment's name, and per worker its `posted` semaphore
    (a command waits) and its `read` one (the worker has taken it)."""

    port: int
    shm_name: str
    posted: list
    read: list


class CommandChannel:
    """One rank's end of the link: rank 0 posts, workers read."""

    def __init__(self, link: TPLink, rank: int):
        self.link, self.rank = link, rank
        self.shm = SharedMemory(name=link.shm_name)

    def _buf(self) -> memoryview:
        assert self.shm.buf is not None  # open until close()
        return self.shm.buf

    def post(self, method: str, args: tuple, workers) -> None:
        """Rank 0: write `method(*args)` for every worker, once each has read the last command. `workers`
        (tp_workers.Workers) waits so that a dead worker raises instead of hanging."""
        data = pickle.dumps((method, args))
        if len(data) + 4 > self.shm.size:
            raise RuntimeError(f"step command of {len(data)} bytes exceeds the shared-memory segment")
        for rank, read in enumerate(self.link.read, 1):
            workers.wait(read, rank)
        buf = self._buf()
        buf[:4] = len(data).to_bytes(4, "little")
        buf[4 : 4 + len(data)] = data
        for posted in self.link.posted:
            posted.release()

    def read(self) -> tuple[str, tuple]:
        """A worker: the next command. A worker whose rank 0 has died leaves (it would wait forever)."""
        posted, read = self.link.posted[self.rank - 1], self.link.read[self.rank - 1]
        while not posted.acquire(timeout=LEADER_CHECK_S):
            leader = mp.parent_process()
            if leader is not None and not leader.is_alive():
                raise SystemExit(f"tensor-parallel worker {self.rank}: rank 0 (pid {leader.pid}) is gone; leaving")
        buf = self._buf()
        n = int.from_bytes(buf[:4], "little")
        method, args = pickle.loads(buf[4 : 4 + n])
        read.release()
        return method, args

    def close(self) -> None:
        self.shm.close()
