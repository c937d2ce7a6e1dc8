"""A real `nanoserve serve` process on 127.0.0.1, started per test module."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:

    def __init__(self, model: str | None, *args: str, env: dict | None = None):
        """`model` None: the command line names it itself (vLLM's positional form)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nanoserve.engine_pod.cli", "serve", *(["--model", model] if model else []),
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *args]
        # A file, not a pipe: a pipe nobody reads fills up (64 KiB of logs) and then blocks the server.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="session")
def tiny_servers(tiny_models):
    """`tiny_servers("sync" | "async")`: the tiny qwen3 served with synchronous scheduling (the CPU default)
    or async scheduling (the GPU default), each started on first use and shared by the session's modules
    (a start costs seconds). Tests must not assume a cold cache or zeroed counters."""
    servers: dict[str, ServerProcess] = {}

    def get(mode: str) -> ServerProcess:
        if mode not in servers:
            servers[mode] = ServerProcess(tiny_models["qwen3"], "--num-kvcache-blocks", "512", "--served-model-name",
                                          "tiny", "--max-model-len", "512",
                                          f"--{'' if mode == 'async' else 'no-'}async-scheduling").wait_ready()
        return servers[mode]
    yield get
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module", params=["sync", "async"])
def tiny_server(tiny_servers, request):
    """Each test of the module against both schedulings."""
    return tiny_servers(request.param)


@pytest.fixture(scope="module")
def default_server(default_model_path):
    """`nanoserve serve` on the embedded default model, as `make serve` runs it."""
    server = ServerProcess("smollm2-135m", "--max-model-len", "512")
    yield server.wait_ready()
    server.stop()


class Servers:
    """Starts servers with their own settings (`servers(model, *args, env=...)`) and stops them all at the end."""

    def __init__(self) -> None:
        self.started: list[ServerProcess] = []

    def __call__(self, model: str, *args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(model, *args, env=env)
        self.started.append(server)
        return server.wait_ready()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def start_server():
    """Extra servers, each stopped when the test ends."""
    servers = Servers()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def module_server():
    """Like start_server, for servers shared by one test module."""
    servers = Servers()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def bpe_server(bpe_model):
    """The byte-level BPE model (it can spell JSON; a Qwen3-like chat template with tools and thinking),
    served with async scheduling and vLLM's tool-call and reasoning flags: the structured-output, tool and
    utility-endpoint tests share it. Launched the way vLLM users write it (positional model, vLLM's names)."""
    server = ServerProcess(None, bpe_model, "--served-model-name", "bpe", "--max-model-len", "1024",
                           "--block-size", "16", "--enable-prefix-caching", "--dtype", "auto", "--seed", "0",
                           "--num-kvcache-blocks", "512", "--async-scheduling", "--tool-call-parser", "hermes",
                           "--enable-auto-tool-choice", "--reasoning-parser", "qwen3")
    yield server.wait_ready()
    server.stop()
