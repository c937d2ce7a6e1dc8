"""`nanoserve up --replicas N`: N engine processes and the gateway in front of them, on one machine.

The engines are `nanoserve serve` subprocesses on free local ports; the gateway runs in this process and
routes to them by prefix cache (it comes up at once and routes to each engine as soon as it is ready).
SIGTERM or SIGINT drains the gateway, then stops the engines (SIGTERM: they drain too) and waits for them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys

log = logging.getLogger("nanoserve.up")


def engine_argv(kwargs: dict) -> list[str]:
    """`engine_kwargs(args)` back to `nanoserve serve` flags (see cli.add_engine_args)."""
    argv = []
    for key, value in kwargs.items():
        if key == "enable_prefix_caching":
            argv += [] if value else ["--no-prefix-caching"]
        elif key == "async_scheduling" and value is not None:
            argv += ["--async-scheduling" if value else "--no-async-scheduling"]
        elif isinstance(value, bool):
            argv += ["--" + key.replace("_", "-")] if value else []
        elif value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_engine(engine_kwargs: dict, port: int, served_name: str, drain_timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoserve.engine_pod.cli", "serve", *engine_argv(engine_kwargs),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
           "--drain-timeout", str(drain_timeout)]
    return subprocess.Popen(cmd)  # logs go to our stdout/stderr


def stop_engines(procs: list[subprocess.Popen], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("engine pid %d did not stop in %.0fs: killing it", p.pid, timeout)
            p.kill()
            p.wait()


async def run_up(engine_kwargs: dict, replicas: int, host: str = "127.0.0.1", port: int = 8080,
                 served_model_name: str | None = None, policy: str = "cache-aware",
                 drain_timeout: float = 30.0) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until every engine has died (exit 1)."""
    from nanoserve.engine_pod.default_model import resolve_model
    from nanoserve.gateway import GatewayConfig
    from nanoserve.gateway.app import serve

    # Resolve once here (the default model is converted on first use), not in N racing engines.
    model = resolve_model(engine_kwargs["model"])
    name = served_model_name or engine_kwargs["model"]  # as the user gave it, like `serve`
    engine_kwargs = {**engine_kwargs, "model": model}
    ports = [free_port() for _ in range(replicas)]
    procs = [start_engine(engine_kwargs, p, name, drain_timeout) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    for url, proc in zip(urls, procs):
        log.info("engine %s (pid %d)", url, proc.pid)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No local tokenizer: the gateway loads the engines' own, as it does in a cluster.
    config = GatewayConfig(host=host, port=port, engines=urls, served_model_name=name, policy=policy,
                           engine_api_key=os.environ.get("NANOSERVE_API_KEY"), drain_timeout=drain_timeout)
    code = 0
    try:
        async with serve(config) as gw:
            log.info("gateway on %s (model %s, %d engines, policy %s)", gw.url, name, replicas, policy)
            dead: set[int] = set()
            while not stop.is_set():
                for proc in procs:
                    if proc.poll() is not None and proc.pid not in dead:
                        dead.add(proc.pid)
                        log.warning("engine pid %d exited with %d", proc.pid, proc.returncode)
                if len(dead) == len(procs):
                    log.error("every engine has exited")
                    code = 1
                    break
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
            log.info("stopping: gateway first, then the engines")
    finally:
        await asyncio.to_thread(stop_engines, procs, drain_timeout + 10)
    return code
