"""`nanoserve up --replicas 2`: two real engines and the gateway from one command, used with the openai client;
an engine that dies is restarted with backoff while the gateway routes around it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import prelaunch
import pytest
from poll import until
from procs import reserve_port

from nanoserve.gateway.endpoints import engine_id
from nanoserve.up import engine_argv


def test_engine_argv_round_trips_through_the_serve_parser():
    import argparse

    from nanoserve.engine_pod.cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(
        [
            "--model",
            "m",
            "--enforce-eager",
            "--no-prefix-caching",
            "--num-kvcache-blocks",
            "64",
            "--device",
            "cpu",
            "--cpu-kvcache-gib",
            "0.5",
        ]
    )
    kwargs = engine_kwargs(args)
    assert kwargs["async_scheduling"] is None  # auto: on with CUDA
    assert engine_kwargs(p.parse_args(engine_argv(kwargs))) == kwargs
    for value in (True, False):
        kwargs["async_scheduling"] = value
        assert engine_kwargs(p.parse_args(engine_argv(kwargs))) == kwargs


def routable_engines(url: str, proc: subprocess.Popen) -> int:
    """How many engines the gateway routes to, by its /ready (0 before it answers); raises if `up` exited."""
    assert proc.poll() is None, "nanoserve up exited early"
    try:
        with urllib.request.urlopen(url + "/ready", timeout=1) as r:
            return json.load(r)["engines"]
    except OSError:
        return 0


def complete(url: str) -> str:
    """One completion through the gateway; which engine answered it."""
    body = json.dumps({"prompt": "w5 w6", "max_tokens": 2}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.load(r)["usage"]["completion_tokens"] == 2
        return r.headers["X-Nanoserve-Engine"]


@prelaunch.plan("nanoserve up", prelaunch.uses("up"), stop=lambda up: kill_tree(up[0]), weight=3)
def launch_up(get) -> tuple[subprocess.Popen, str, pathlib.Path]:
    """`nanoserve up --replicas 2` on the tiny qwen3 (three processes): (process, url, log)."""
    port = reserve_port()
    log = get("tmp_path_factory").mktemp("up") / "up.log"
    # Round-robin: after the restart, the restarted engine is sure to get its turn.
    cmd = [
        sys.executable,
        "-m",
        "nanoserve.cli",
        "up",
        "--replicas",
        "2",
        "--model",
        get("tiny_models")["qwen3"],
        "--port",
        str(port),
        "--num-kvcache-blocks",
        "256",
        "--max-model-len",
        "512",
        "--served-model-name",
        "tiny",
        "--policy",
        "round-robin",
    ]
    with open(log, "wb") as out:
        # Own session: if the test fails, the whole tree is killed.
        proc = subprocess.Popen(
            cmd, env={**os.environ, "PYTHONSAFEPATH": "1"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}", log


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def up(request):
    """`nanoserve up`, started ahead of its test (tests/prelaunch.py): (process, url, log)."""
    proc, url, log = prelaunch.take("nanoserve up", request.getfixturevalue)
    yield proc, url, log
    kill_tree(proc)


def test_up_serves_chat_survives_a_killed_engine_and_stops_cleanly(up):
    import openai

    proc, url, log = up
    try:
        until(lambda: routable_engines(url, proc) == 2, "the gateway to route to both engines", timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        messages = [{"role": "system", "content": "w10 w11 w12"}, {"role": "user", "content": "w20 w21 w22"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        # All 8 tokens, unless the random model drew its EOS (w1) among them.
        finish, tokens = reply.choices[0].finish_reason, reply.usage.completion_tokens
        assert (finish, tokens) == ("length", 8) or (finish == "stop" and 0 < tokens <= 8), (finish, tokens)
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == reply.choices[0].message.content  # greedy: the same reply, streamed

        # SIGKILL an engine: the gateway routes around it and `up` restarts it on its port.
        victim_url, victim_pid = re.search(r"engine (\S+) \(pid (\d+)\)", log.read_text()).groups()
        os.kill(int(victim_pid), signal.SIGKILL)
        complete(url)  # the other engine answers (on the dead one's refused connection, the gateway retries)
        # Round-robin: once the restarted engine is ready, the gateway sends it every other request (only an
        # answer from the restarted one can name the victim now). While one engine is routable, no request:
        # the restarting engine needs the cores.
        until(
            lambda: routable_engines(url, proc) == 2 and complete(url) == engine_id(victim_url),
            "the killed engine to be restarted and routed to",
            120,
        )
        assert re.search(rf"engine {re.escape(victim_url)} restarted \(pid \d+\)", log.read_text())

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = log.read_text()
        pids = {int(p) for p in re.findall(r"\(pid (\d+)\)", out)}
        assert len(pids) == 3  # two engines and the restarted one
        # `up` reaped each engine (it logs the exit code it got): the killed one before restarting it, the
        # others once they had drained (exit 0). None is left behind, not even as a zombie.
        assert re.search(rf"engine {re.escape(victim_url)} \(pid {victim_pid}\) exited with -9", out)
        stopped = {int(pid): int(code) for pid, code in re.findall(r"engine pid (\d+) stopped with (-?\d+)", out)}
        assert stopped == dict.fromkeys(pids - {int(victim_pid)}, 0)
        assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []
    finally:
        kill_tree(proc)
        print(log.read_text()[-3000:])


class FakeProc:
    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        return self.returncode


def test_an_exited_engine_is_restarted_on_its_port_with_doubling_backoff():
    from nanoserve.up import STABLE_S, Supervised, restart_delay

    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    started: list[tuple[int, FakeProc]] = []

    def start(port: int) -> FakeProc:
        started.append((port, FakeProc(len(started))))
        return started[-1][1]

    engine = Supervised(8001, start, now=0.0)
    t = 0.0
    for crash, delay in enumerate([1, 2, 4], 1):  # crash loop: each restart waits twice as long
        engine.proc.returncode = 1
        engine.check(t)
        engine.check(t + delay - 0.1)
        assert len(started) == crash
        engine.check(t + delay)
        assert len(started) == crash + 1 and engine.proc is started[-1][1]
        t += delay
    t += STABLE_S  # the engine ran for a while: the next crash is restarted after a second again
    engine.proc.returncode = -9
    engine.check(t)
    engine.check(t + 1)
    assert len(started) == 5 and {port for port, _ in started} == {8001}
    engine.check(t + 2)  # running: nothing to do
    assert len(started) == 5


def test_a_held_port_is_left_to_its_server_even_across_restarts():
    """common/ports.py, as `nanoserve up` holds its engines' ports: a bind without SO_REUSEADDR is refused, a
    server (asyncio sets SO_REUSEADDR) binds it, and again once restarted; in between, connections are refused."""
    from nanoserve.common.ports import PortReservation

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"up")
        await writer.drain()
        writer.close()

    async def serve_one_connection(port: int) -> bytes:
        async with await asyncio.start_server(answer, "127.0.0.1", port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = await reader.read()
            writer.close()
            return data

    with PortReservation() as held:
        with socket.socket() as other, pytest.raises(OSError) as refused:
            other.bind(("127.0.0.1", held.port))
        assert refused.value.errno == errno.EADDRINUSE
        assert asyncio.run(serve_one_connection(held.port)) == b"up"
        with pytest.raises(ConnectionRefusedError):  # held, not listening: no server, no connection
            socket.create_connection(("127.0.0.1", held.port), timeout=5)
        assert asyncio.run(serve_one_connection(held.port)) == b"up"  # the server restarted on its port
