"""Several gateway processes on one port (`--workers N`), for bursts that one event loop cannot relay alone.

Each worker is a whole gateway (probes, cache feeds, tokenizers, routing) in its own process, listening on
the same port with SO_REUSEPORT: the kernel spreads new connections over them. Each routes by its own view
of the engines, which the engines' cache feeds keep the same in all of them; load counts are each worker's
own share, as with gateway replicas. Their Prometheus metrics add up through prometheus_client's
multiprocess files, so that /metrics on any worker tells the whole gateway. This supervisor restarts a
worker that dies, and on SIGTERM or SIGINT has every worker drain its open requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess

from nanoserve.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's: set before a worker imports it
RESTART_BACKOFF = 1.0  # seconds before a dead worker is started again


def _worker_main(config: GatewayConfig, log_level: str, supervisor: int) -> None:
    from nanoserve.common import event_loop
    from nanoserve.common.torch_free import keep_torch_out
    from nanoserve.gateway.app import run_gateway

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_torch_out()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the supervisor, which stops us
    _drain_when_gone(supervisor)
    try:
        event_loop.run(run_gateway(config))
    except asyncio.CancelledError:
        pass  # SIGTERM cancelled the server after draining


def _drain_when_gone(supervisor: int) -> None:
    """SIGTERM (a drain) to this worker when the supervisor dies, even by SIGKILL: an orphan would go on
    taking the port's connections, with nobody to stop it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: a SIGKILLed supervisor leaves its workers behind
        return
    if os.getppid() != supervisor:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _held_port(host: str) -> tuple[socket.socket, int]:
    """A free port, kept bound (not listening: it takes no connections) so that no other process gets it
    while the workers bind it with SO_REUSEPORT (common/ports.py explains the trick)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host or "0.0.0.0", 0))
    return sock, sock.getsockname()[1]


def run_workers(config: GatewayConfig, log_level: str = "INFO") -> int:
    """Serve with `config.workers` processes until SIGTERM/SIGINT; 0 once every worker has drained."""
    held = None
    if config.port == 0:
        held, port = _held_port(config.host)
        config = dataclasses.replace(config, port=port)
    metrics_dir = tempfile.mkdtemp(prefix="nanoserve-gateway-metrics-")
    os.environ[MULTIPROC_DIR] = metrics_dir  # inherited by the (spawned) workers
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing of this one's state
    stopping = False

    def start() -> BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(config, log_level, os.getpid()), name="nanoserve-gateway-worker")
        proc.start()
        return proc

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in workers:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    workers = [start() for _ in range(config.workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("gateway on port %d with %d workers (pids %s)", config.port, len(workers), [p.pid for p in workers])
    try:
        while True:
            alive = [p for p in workers if p.is_alive()]
            if stopping and not alive:
                break
            multiprocessing.connection.wait([p.sentinel for p in alive] or [], timeout=1.0)
            for i, p in enumerate(workers):
                if p.is_alive() or stopping:
                    continue
                _forget(p.pid, metrics_dir)
                log.warning("gateway worker %s exited with %s: starting another", p.pid, p.exitcode)
                time.sleep(RESTART_BACKOFF)
                if not stopping:
                    workers[i] = start()
    finally:
        for p in workers:
            p.join(timeout=0)
        if held is not None:
            held.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _forget(pid: int | None, metrics_dir: str) -> None:
    """A dead worker's live gauges (its open requests, its view of the engines) stop counting; its counters
    stay, as counters never go down."""
    if pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)
