"""Helpers for tests that run real processes and servers: ports held for them, bounded waits for HTTP,
`nanoserve serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from poll import until

from nanoserve.common.ports import PortReservation

_held: list[PortReservation] = []


def reserve_port(host: str = "127.0.0.1") -> int:
    """A free port of `host` for a server this session starts (or restarts) on it, held until the session
    ends (`release_ports`): no other process can be given it meanwhile (common/ports.py)."""
    _held.append(PortReservation(host))
    return _held[-1].port


def release_ports() -> None:
    while _held:
        _held.pop().close()


def answers(url: str, proc: subprocess.Popen | None = None) -> bool:
    """Whether `url` answers 200 now; raises if `proc` has exited (it never will)."""
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"process exited with {proc.returncode}")
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except OSError:  # refused, not yet listening, or a non-200 answer (HTTPError)
        return False


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200 (bounded); give up early if `proc` exits."""
    until(lambda: answers(url, proc), f"{url} to answer 200", timeout)


class ServerProcess:
    """`nanoserve serve` on 127.0.0.1 and a port held for it (`.url`, `.port`, `.proc`), started at construction;
    `wait_ready()` waits until its /ready says 200."""

    def __init__(self, model: str | None, *args: str, env: dict | None = None):
        """`model` None: the command line names it itself (vLLM's positional form)."""
        self.port = reserve_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "nanoserve.cli",
            "serve",
            *(["--model", model] if model else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *args,
        ]
        # A file, not a pipe: a pipe nobody reads fills up (64 KiB of logs) and then blocks the server.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        try:
            wait_http(f"{self.url}/ready", timeout, self.proc)
        except RuntimeError:
            raise RuntimeError(f"server exited early:\n{self.output()}") from None
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def stop_later(self) -> None:
        """SIGTERM now; its exit is reaped at the end of the session (`reap`): a fixture's teardown need not
        wait out the shutdown (a second or two) when nothing checks how the server exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            _stopping.append(self.proc)


_stopping: list[subprocess.Popen] = []


def reap(timeout: float = 60) -> None:
    """Wait for the processes stopped with stop_later (killing those still up after `timeout`)."""
    deadline = time.monotonic() + timeout
    while _stopping:
        proc = _stopping.pop()
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
