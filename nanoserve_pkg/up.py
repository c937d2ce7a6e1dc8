"""`nanoserve up --replicas N`: N engine processes and the gateway in front of them, on one machine.

The engines are `nanoserve serve` subprocesses on local ports held for them (common/ports.py: no other
process can take one, even while its engine restarts); the gateway runs in this process and
routes to them by prefix cache (it comes up at once and routes to each engine as soon as it is ready).
An engine that exits (a crash, a failed engine's exit 1, the OOM killer) is restarted on the same port
after a backoff that doubles with each crash in a row; meanwhile the gateway routes to the others, and to
the new one once its /ready says so. SIGTERM or SIGINT drains the gateway, then stops the engines
(SIGTERM: they drain too) and waits for them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from nanoserve.common import event_loop
from nanoserve.common.flags import HelpFormatter, add_flags, settings_from_args
from nanoserve.common.ports import PortReservation
from nanoserve.engine_pod.cli import add_chat_args, add_engine_args, chat_argv, engine_kwargs
from nanoserve.engine_pod.config import engine_argv
from nanoserve.gateway.config import GatewayConfig

log = logging.getLogger("nanoserve.up")

BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0
STABLE_S = 60.0  # an engine that ran this long had recovered: its next crash counts as the first again


def restart_delay(crashes: int) -> float:
    """Seconds to wait before restarting an engine after its `crashes`-th crash in a row: 1, 2, 4, ... 30."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (crashes - 1))


class Supervised:
    """One engine slot: a `nanoserve serve` process on a fixed port (the gateway knows it by URL), restarted
    with backoff whenever it exits. `check` is called every second or so by `run_up`."""

    def __init__(self, port: int, start: Callable[[int], subprocess.Popen], now: float):
        self.port, self.start = port, start
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start(port)
        self.started_at, self.crashes, self.restart_at = now, 0, None
        log.info("engine %s (pid %d)", self.url, self.proc.pid)

    def check(self, now: float) -> None:
        if self.restart_at is None:
            if self.proc.poll() is None:
                return
            self.crashes = 1 if now - self.started_at >= STABLE_S else self.crashes + 1
            self.restart_at = now + restart_delay(self.crashes)
            log.warning(
                "engine %s (pid %d) exited with %d; restarting it in %.0fs",
                self.url,
                self.proc.pid,
                self.proc.returncode,
                self.restart_at - now,
            )
        elif now >= self.restart_at:
            self.proc, self.started_at, self.restart_at = self.start(self.port), now, None
            log.info("engine %s restarted (pid %d)", self.url, self.proc.pid)


def start_engine(
    engine_kwargs: dict, port: int, served_name: str, drain_timeout: float, engine_args: list[str] | tuple[()] = ()
) -> subprocess.Popen:
    """`engine_kwargs`: Config settings; `engine_args`: more `nanoserve serve` flags (the chat flags)."""
    cmd = [
        sys.executable,
        "-m",
        "nanoserve.cli",
        "serve",
        *engine_argv(engine_kwargs),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        served_name,
        "--drain-timeout",
        str(drain_timeout),
        *engine_args,
    ]
    return subprocess.Popen(cmd)  # logs go to our stdout/stderr


def stop_engines(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM (they drain), then wait for each and log how it exited: none is left behind, not even as a zombie."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("engine pid %d did not stop in %.0fs: killing it", p.pid, timeout)
            p.kill()
            code = p.wait()
        log.info("engine pid %d stopped with %d", p.pid, code)


async def run_up(
    engine_kwargs: dict, replicas: int, gateway: GatewayConfig, engine_args: list[str] | tuple[()] = ()
) -> int:
    """Serve until SIGTERM/SIGINT (exit 0), restarting engines that exit. `gateway`: its host, port, policy,
    drain timeout (the engines' too) and served model name (the engines' too; default: the model as given)."""
    from nanoserve.engine_pod.default_model import resolve_model
    from nanoserve.gateway.app import serve

    # Resolve once here (the default model is converted on first use), not in N racing engines.
    model = resolve_model(engine_kwargs["model"])
    name = gateway.served_model_name or engine_kwargs["model"]  # as the user gave it, like `serve`
    engine_kwargs = {**engine_kwargs, "model": model}
    ports = [PortReservation() for _ in range(replicas)]  # held until the end: an engine restarts on its own
    engines = [
        Supervised(
            port.port,
            lambda p: start_engine(engine_kwargs, p, name, gateway.drain_timeout, engine_args),
            time.monotonic(),
        )
        for port in ports
    ]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No local tokenizer: the gateway loads the engines' own, as it does in a cluster.
    config = dataclasses.replace(
        gateway,
        engines=[e.url for e in engines],
        served_model_name=name,
        engine_api_key=os.environ.get("NANOSERVE_API_KEY"),
    )
    try:
        async with serve(config) as gw:
            log.info("gateway on %s (model %s, %d engines, policy %s)", gw.url, name, replicas, config.policy)
            while not stop.is_set():
                for engine in engines:
                    engine.check(time.monotonic())
                try:
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
                except TimeoutError:
                    pass
            log.info("stopping: gateway first, then the engines")
    finally:
        await asyncio.to_thread(stop_engines, [e.proc for e in engines], config.drain_timeout + 10)
        for port in ports:
            port.close()
    return 0


# `nanoserve up`'s flags for its gateway (the rest of the gateway's config has its defaults there).
UP_GATEWAY_SETTINGS = ("host", "port", "served_model_name", "policy", "drain_timeout")


def add_command(sub) -> None:
    """`up`, on the `nanoserve` command's subparsers."""
    up = sub.add_parser(
        "up",
        help="N local engine processes and the gateway in front (CPU by default)",
        description="N local `nanoserve serve` engines on free ports, and the gateway in front of "
        "them: --host and --port are the gateway's",
        formatter_class=HelpFormatter,
    )
    add_engine_args(up, defaults={"device": "cpu"})
    up.add_argument("--replicas", type=int, default=2, help="engine processes")
    add_flags(up, GatewayConfig, UP_GATEWAY_SETTINGS, defaults={"host": "127.0.0.1"})
    add_chat_args(up)
    up.set_defaults(fn=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    gateway = GatewayConfig(**settings_from_args(GatewayConfig, args, UP_GATEWAY_SETTINGS))
    return event_loop.run(run_up(engine_kwargs(args), args.replicas, gateway, chat_argv(args)))
