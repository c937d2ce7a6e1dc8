"""A tensor-parallel worker, the grammar process or the engine core process SIGKILLed mid-generation (issue
16): the server fails the engine within seconds, every request ends with an error, /ready says 503, and the
server exits 1."""

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable

import aiohttp
import prelaunch
import pytest
from procs import reserve_port, wait_http


def _children(pid: int) -> list[int]:
    children = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children.update(int(c) for c in f.read().split())
    return sorted(children)


def only(pids: list[int]) -> int:
    [pid] = pids
    return pid


def grammar_process(engine_core: int) -> int:
    """The engine core's grammar process (engine_pod/grammar_process.py), started by its first constrained request."""
    return only([c for c in _children(engine_core) if b"grammar_process" in open(f"/proc/{c}/cmdline", "rb").read()])


def spawned_children(pid: int) -> list[int]:
    """The processes `pid` started with multiprocessing (not its resource tracker): the server's engine core
    (spawned), the engine core's tensor-parallel workers (forked by its forkserver)."""
    found = []
    for c in _children(pid):
        cmdline = open(f"/proc/{c}/cmdline", "rb").read()
        if b"spawn_main" in cmdline:
            found.append(c)
        elif b"forkserver" in cmdline:
            found += _children(c)
    return found


async def _probe(url: str) -> dict[str, list[int]]:
    """/ready and /health answers, polled on fresh connections until the server stops listening."""
    seen: dict[str, list[int]] = {"/ready": [], "/health": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        while True:
            for path, answers in seen.items():
                try:
                    async with s.get(url + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        answers.append(r.status)
                except (TimeoutError, aiohttp.ClientError):
                    return seen
            await asyncio.sleep(0.01)


EARLY, LATE = 8, 10  # requests sent while the engine steps (max-num-seqs 4: half run, half wait), and after


def streamed(i: int) -> bool:
    """Early requests alternate; late ones stream: their headers say the server has submitted them."""
    return i % 2 == 0 or i >= EARLY


async def _kill_mid_generation(url: str, victim: Callable[[], int], early: dict):
    """Requests running, waiting in the scheduler and waiting in the engine's inbox when the `victim()` process
    dies (asked for once the engine steps); the early ones have `early` in their bodies."""
    async with aiohttp.ClientSession() as s:
        streaming = asyncio.Event()  # a stream has its first token: the engine is stepping
        submitted = [asyncio.Event() for _ in range(EARLY + LATE)]  # a stream's headers are in

        async def one(i: int):
            body = {"prompt": [i + 3] * 20, "max_tokens": 400, "ignore_eos": True, "stream": streamed(i)}
            body |= early if i < EARLY else {}
            async with s.post(url + "/v1/completions", json=body) as r:
                if not body["stream"]:
                    return r.status, await r.json()
                submitted[i].set()  # the server sends a stream's headers once the engine has the request
                events = []
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events.append(line[6:].decode().strip())
                        streaming.set()
                return r.status, events

        tasks = [asyncio.create_task(one(i)) for i in range(EARLY)]
        await asyncio.wait_for(streaming.wait(), 60)
        # Stopped, the worker holds rank 0 in a collective (the grammar process: in a wait for its reply): what
        # comes now stays in the inbox.
        worker = victim()
        os.kill(worker, signal.SIGSTOP)
        tasks += [asyncio.create_task(one(i)) for i in range(EARLY, EARLY + LATE)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in submitted[EARLY:])), 60)
        os.kill(worker, signal.SIGKILL)
        probe = asyncio.create_task(_probe(url))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)  # the bound of issue 16
        return worker, results, await asyncio.wait_for(probe, 30)


VICTIMS = ["tp worker", "grammar process", "engine core"]
# The grammar process's requests: constrained (it starts with the first), never done within max_tokens.
CONSTRAINED = {"structured_outputs": {"regex": "[a-z]{2000}"}}


def launch_server(victim: str, get) -> tuple[subprocess.Popen, str, pathlib.Path]:
    """The server whose `victim` the test kills: (process, url, log)."""
    port = reserve_port()
    log = get("tmp_path_factory").mktemp("tp-faults") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nanoserve.cli",
                "serve",
                "--model",
                get("bpe_model") if victim == "grammar process" else get("tiny_models")["qwen3"],
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--tensor-parallel-size",
                "2" if victim == "tp worker" else "1",
                "--max-num-seqs",
                "4",
                "--num-kvcache-blocks",
                "256",
                "--max-model-len",
                "512",
                *(["--async-scheduling", "--grammar-process"] if victim == "grammar process" else []),
            ],
            env={**os.environ, "PYTHONSAFEPATH": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}", log


def _kill(server) -> None:
    server[0].kill()
    server[0].wait()


for _victim in VICTIMS:  # each started ahead of its test (tests/prelaunch.py)
    prelaunch.plan(f"tp-faults {_victim}", prelaunch.param("victim", _victim, __file__), stop=_kill)(
        lambda get, victim=_victim: launch_server(victim, get)
    )


@pytest.mark.parametrize("victim", VICTIMS)
def test_a_killed_engine_process_ends_every_request_with_an_error_and_the_server_exits(victim, request):
    proc, url, log = prelaunch.take(f"tp-faults {victim}", request.getfixturevalue)
    try:
        wait_http(url + "/ready", 120, proc)
        [engine_core] = spawned_children(proc.pid)
        find = {
            "tp worker": lambda: only(spawned_children(engine_core)),
            "grammar process": lambda: grammar_process(engine_core),
            "engine core": lambda: engine_core,
        }[victim]
        early = CONSTRAINED if victim == "grammar process" else {}
        pid, results, probed = asyncio.run(_kill_mid_generation(url, find, early))
        died = {
            "tp worker": f"tensor-parallel worker 1 (pid {pid}) died with signal SIGKILL",
            "grammar process": f"GrammarProcessDied: the grammar process (pid {pid}) closed its socket and exited "
            "(signal SIGKILL)",
            "engine core": f"the engine core process (pid {pid}) closed its pipe and exited (signal SIGKILL)",
        }[victim]
        for i, (status, answer) in enumerate(results):
            if streamed(i):  # it had started, and it ends with an error event instead of [DONE]
                error = json.loads(answer[-1])["error"]
                assert status == 200 and error["code"] == "engine_failed" and died in error["message"], answer[-1]
            else:
                assert status == 500 and died in answer["error"]["message"], answer
        # Once it knows, and until it stops listening, the failed server takes no traffic.
        for path, failed in (("/ready", 503), ("/health", 500)):
            answers = probed[path]
            assert failed in answers and set(answers[answers.index(failed) :]) == {failed}, probed
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        print(log.read_text()[-4000:])
