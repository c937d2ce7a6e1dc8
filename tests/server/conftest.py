"""Real `nanoserve serve` processes on 127.0.0.1 (procs.ServerProcess), shared by the session or a module."""

import prelaunch
import pytest
from procs import ServerProcess


def tiny_qwen3_server(mode: str, get) -> ServerProcess:
    """The tiny qwen3 served with synchronous scheduling (the CPU default) or async scheduling (the GPU default)."""
    return ServerProcess(
        get("tiny_models")["qwen3"],
        "--num-kvcache-blocks",
        "512",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "512",
        f"--{'' if mode == 'async' else 'no-'}async-scheduling",
    )


# Started ahead of their first tests (tests/prelaunch.py): every user of tiny_servers needs the synchronous one.
prelaunch.plan("tiny-sync", prelaunch.uses("tiny_servers"))(lambda get: tiny_qwen3_server("sync", get))
prelaunch.plan("tiny-async", prelaunch.param("tiny_server", "async"))(lambda get: tiny_qwen3_server("async", get))


@pytest.fixture(scope="session")
def tiny_servers(tiny_models, request):
    """`tiny_servers("sync" | "async")`: the tiny qwen3 served with synchronous scheduling (the CPU default)
    or async scheduling (the GPU default), each started on first use and shared by the session's modules
    (a start costs seconds). Tests must not assume a cold cache or zeroed counters."""
    servers: dict[str, ServerProcess] = {}

    def get(mode: str) -> ServerProcess:
        if mode not in servers:
            servers[mode] = prelaunch.take(f"tiny-{mode}", request.getfixturevalue)
        return servers[mode].wait_ready()

    yield get
    for server in servers.values():
        server.stop_later()


@pytest.fixture(scope="module", params=["sync", "async"])
def tiny_server(tiny_servers, request):
    """Each test of the module against both schedulings."""
    return tiny_servers(request.param)


@prelaunch.plan("default", prelaunch.uses("default_server"), weight=2)  # twice a tiny one's memory
def launch_default_server(get) -> ServerProcess:
    get("default_model_path")  # converted once, before the server looks for it
    return ServerProcess("smollm2-135m", "--max-model-len", "512")


@pytest.fixture(scope="module")
def default_server(default_model_path, request):
    """`nanoserve serve` on the embedded default model, as `make serve` runs it."""
    server = prelaunch.take("default", request.getfixturevalue)
    yield server.wait_ready()
    server.stop_later()


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


@prelaunch.plan("bpe", prelaunch.uses("bpe_server"))
def launch_bpe_server(get) -> ServerProcess:
    return ServerProcess(
        None,
        get("bpe_model"),
        "--served-model-name",
        "bpe",
        "--max-model-len",
        "1024",
        "--block-size",
        "16",
        "--enable-prefix-caching",
        "--dtype",
        "auto",
        "--seed",
        "0",
        "--num-kvcache-blocks",
        "512",
        "--async-scheduling",
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
        "--reasoning-parser",
        "qwen3",
    )


@pytest.fixture(scope="session")
def bpe_server(bpe_model, request):
    """The byte-level BPE model (it can spell JSON; a Qwen3-like chat template with tools and thinking),
    served with async scheduling and vLLM's tool-call and reasoning flags: the structured-output, tool and
    utility-endpoint tests share it. Launched the way vLLM users write it (positional model, vLLM's names)."""
    server = prelaunch.take("bpe", request.getfixturevalue)
    yield server.wait_ready()
    server.stop_later()
