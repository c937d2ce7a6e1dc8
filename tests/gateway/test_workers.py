"""`--workers N`: gateway processes sharing one port, whose /metrics add up, restarted when one dies, all
drained on SIGTERM. Real processes and real HTTP, a new connection per request (the kernel spreads them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from poll import until
from procs import reserve_port, wait_http


def _completion(url: str) -> int:
    body = json.dumps({"prompt": "w1 w2", "max_tokens": 2}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # urllib: one connection per request
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _served(url: str) -> float:
    """requests_total as /metrics says it, from whichever worker answers."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nanoserve_gateway_requests_total{")
    )


def _workers(pid: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    out = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            out.add(int(child))
    return out


def test_workers_share_the_port_add_up_their_metrics_restart_and_drain(fake_engines_shared):
    (engine,) = fake_engines_shared(1, serve_tokenizer=False)
    port = reserve_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["--host", "127.0.0.1", "--port", str(port), "--engine", engine.url, "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoserve.gateway", *argv, "--health-interval", "0.2", "--log-level", "WARNING"],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    try:
        until(lambda: len(_workers(proc.pid)) == 2, "two workers")
        first = _workers(proc.pid)
        wait_http(url + "/ready", proc=proc)
        assert all(_completion(url) == 200 for _ in range(40))  # 40 connections: both workers serve some
        assert {_served(url) for _ in range(6)} == {40.0}  # every worker's /metrics counts both's requests

        os.kill(min(first), signal.SIGKILL)
        until(lambda: len(_workers(proc.pid)) == 2 and _workers(proc.pid) != first, "a worker started anew")
        # The new worker listens once it can route: not one request gets a 503 meanwhile.
        assert all(_completion(url) == 200 for _ in range(20))
        assert {_served(url) for _ in range(6)} == {60.0}  # the dead worker's requests still count

        workers = _workers(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def _running(pid: int) -> bool:
    """Not exited (a zombie nobody has reaped yet has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_workers_of_a_killed_supervisor_drain_and_exit(fake_engines_shared):
    """SIGKILL of the supervisor (no chance to stop them): its workers do not go on serving the port alone."""
    (engine,) = fake_engines_shared(1, serve_tokenizer=False)
    argv = ["--host", "127.0.0.1", "--port", str(reserve_port()), "--engine", engine.url, "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoserve.gateway", *argv, "--log-level", "WARNING"],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    try:
        workers = until(lambda: len(_workers(proc.pid)) == 2 and _workers(proc.pid), "two workers")
        proc.kill()
        proc.wait()
        until(lambda: not any(_running(w) for w in workers), "the workers to exit", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
