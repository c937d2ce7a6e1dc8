"""Fixtures for gateway tests: a tiny tokenizer folder, fake engine processes, an in-process gateway.

Everything listens on 127.0.0.1. Fake engines come from `spawn_engines(n, **options)` (fresh processes),
`fake_engines_shared(n, **options)` (processes with the tiny tokenizer, kept for the session) or
`local_engines` (in this process); `backend` gives the same interface over fake or real `nanoserve serve`
processes (objects with `.url`, `.proc`, `.kill()`, `.restart()`), so routing tests run against both.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import prelaunch
import pytest
from poll import until_async
from procs import reserve_port, wait_http

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
WORDS = ["system", "user", "assistant", "ok"] + [f"w{i}" for i in range(500)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A Hugging Face tokenizer folder: whitespace word-level vocab, BOS added by encode(), a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(path)
    return str(path)


class EngineProcess:
    """An engine in a subprocess on a port held for it (so a restart keeps its URL): `.url`, `.proc`, `.kill()`,
    `.restart()`. `args` are the command after the port is known; `ready_path` answers 200 once it serves."""

    def __init__(self, args: list[str], ready_path: str = "/health", log: Path | None = None) -> None:
        self.port = reserve_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [a.format(port=self.port) for a in args]
        self.ready_path, self.log = ready_path, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log, "ab") if self.log else None  # real engines log their loading; keep it for failures
        self.proc = subprocess.Popen(
            self.args, env={**os.environ, "PYTHONSAFEPATH": "1"}, stdout=out, stderr=subprocess.STDOUT if out else None
        )
        if out:
            out.close()

    def wait(self, timeout: float = 120.0) -> None:
        try:
            wait_http(self.url + self.ready_path, timeout, self.proc)
        except (TimeoutError, RuntimeError) as e:
            tail = self.log.read_text()[-3000:] if self.log and self.log.exists() else ""
            raise RuntimeError(f"{self.args[:5]}: {e}\n{tail}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.wait()


def fake_args(name: str, options: dict) -> list[str]:
    """The command of tests/gateway/fake_engine.py with FakeConfig options."""
    args = [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--name", name]
    for k, v in options.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def fake_engine(name: str, options: dict) -> EngineProcess:
    return EngineProcess(fake_args(name, options))


def real_engine(model: str, log: Path, *engine_args: str) -> EngineProcess:
    """`nanoserve serve` on CPU; ready once the model is loaded."""
    args = [
        sys.executable,
        "-m",
        "nanoserve.cli",
        "serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--device",
        "cpu",
        *engine_args,
    ]
    return EngineProcess(args, "/ready", log)


def start_all(engines: list[EngineProcess]) -> None:
    for e in engines:  # start all, then wait: they boot in parallel
        e.start()
    for e in engines:
        e.wait()


@pytest.fixture
def spawn_engines():
    """`spawn_engines(n, **FakeConfig options)`: fake engines, killed when the test ends."""
    started: list[EngineProcess] = []

    def spawn(n: int, **options) -> list[EngineProcess]:
        engines = [fake_engine(f"e{len(started) + i}", options) for i in range(n)]
        started.extend(engines)
        start_all(engines)
        return engines

    yield spawn
    for e in started:
        e.kill()


class SharedFake(EngineProcess):
    """A fake engine process kept for the session; `configure` resets it through /fake/state: empty cache,
    zero counters, every runtime setting at `defaults` but `options` (also after a restart)."""

    def __init__(self, name: str, tokenizer: str, defaults: dict) -> None:
        super().__init__(fake_args(name, {"tokenizer": tokenizer}))
        self.defaults, self.options = defaults, {}

    def configure(self, options: dict) -> None:
        body = json.dumps({**self.defaults, **options, "reset": True}).encode()
        req = urllib.request.Request(self.url + "/fake/state", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()
        self.options = options

    def restart(self) -> None:
        super().restart()
        self.configure(self.options)


@pytest.fixture(scope="session")
def fake_engines_shared(tiny_tokenizer, fake_engine_module):
    """`take(n, **FakeConfig options)`: the first n of a few fake engine processes with the tiny tokenizer,
    started on first use and shared by the session (each start imports transformers), configured anew at
    each take; dead ones are restarted."""
    from dataclasses import fields

    at_start = {"name", "model", "tokenizer", "exit_on_crash"}
    defaults = {f.name: f.default for f in fields(fake_engine_module.FakeConfig) if f.name not in at_start}
    pool: list[SharedFake] = []

    def take(n: int, **options) -> list[SharedFake]:
        assert not at_start & set(options), f"fixed when the process starts: {at_start & set(options)}"
        while len(pool) < n:
            pool.append(SharedFake(f"s{len(pool)}", tiny_tokenizer, defaults))
        start_all([e for e in pool[:n] if e.proc is None or e.proc.poll() is not None])
        for e in pool[:n]:
            e.configure(options)
        return pool[:n]

    yield take
    for e in pool:
        e.kill()


REAL_BLOCK_SIZE = 8  # small blocks: short test conversations still span several
REAL_ENGINE_ARGS = (
    "--kvcache-block-size",
    str(REAL_BLOCK_SIZE),
    "--num-kvcache-blocks",
    "1024",
    "--max-model-len",
    "1024",
    "--served-model-name",
    "tiny",
)


REAL_ENGINES = 3  # the most that a test takes


def launch_real_engines(get) -> list[EngineProcess]:
    """REAL_ENGINES `nanoserve serve` processes on the tiny qwen3 model, started (not yet ready)."""
    logs = get("tmp_path_factory").mktemp("engine-logs")
    model = get("tiny_models")["qwen3"]
    pool = [real_engine(model, logs / f"e{i}.log", *REAL_ENGINE_ARGS) for i in range(REAL_ENGINES)]
    for e in pool:  # they boot in parallel
        e.start()
    return pool


# Started ahead of the first test that takes them (tests/prelaunch.py).
prelaunch.plan(
    "real-engines",
    lambda item: "real_engine_pool" in getattr(item, "fixturenames", ()) or prelaunch.param("backend", "real")(item),
    stop=lambda pool: [e.kill() for e in pool],
    weight=REAL_ENGINES,
)(launch_real_engines)


@pytest.fixture(scope="session")
def real_engine_pool(tiny_models, request):
    """`take(n)`: the first n of a few `nanoserve serve` processes on the tiny qwen3 model, started ahead of
    the first test that takes them and shared by the session (each costs a torch import and a model load);
    dead ones are restarted. Tests must not assume cold caches."""
    pool: list[EngineProcess] = prelaunch.take("real-engines", request.getfixturevalue)
    logs = pool[0].log.parent

    def take(n: int) -> list[EngineProcess]:
        while len(pool) < n:
            pool.append(real_engine(tiny_models["qwen3"], logs / f"e{len(pool)}.log", *REAL_ENGINE_ARGS))
        start_all([e for e in pool[:n] if e.proc is None or e.proc.poll() is not None])
        for e in pool[:n]:  # (those started ahead may still be loading)
            e.wait()
        return pool[:n]

    yield take
    for e in pool:
        e.kill()


@dataclass
class Backend:
    """Engines behind the gateway, fake or real, with what a test needs to talk to them."""

    kind: str  # "fake" | "real"
    tokenizer: str  # the engines' tokenizer folder (the gateway's `model`)
    model: str  # the served model name
    spawn: Callable[..., list[EngineProcess]]  # spawn(n, block_size=..., latency=..., tokens=...)


# Fake-engine options a real engine has by nature (pacing) and may ignore.
_PACING = {"latency", "tokens", "tokenizer"}


@pytest.fixture(params=["fake", "real"])
def backend(request, tiny_tokenizer) -> Backend:
    """The same routing tests against fake engines (fast, exact) and real `nanoserve serve` processes."""
    if request.param == "fake":
        return Backend("fake", tiny_tokenizer, "fake-model", request.getfixturevalue("fake_engines_shared"))
    take = request.getfixturevalue("real_engine_pool")

    def spawn_real(n: int, **options) -> list[EngineProcess]:
        options = {k: v for k, v in options.items() if k not in _PACING}
        if options.pop("block_size", REAL_BLOCK_SIZE) != REAL_BLOCK_SIZE or options:
            raise ValueError(f"real engines cannot do {options}: use spawn_engines (fake) for faults")
        return take(n)

    return Backend("real", request.getfixturevalue("tiny_models")["qwen3"], "tiny", spawn_real)


@pytest.fixture
def start_gateway():
    """`async with start_gateway(urls, **config) as gw:` serves a gateway on a free port (gw.url), with
    fast health checks, and waits until every engine is routable and (wait_tokenizers) has its tokenizer
    settled, as the gateway's /ready does."""
    from nanoserve.gateway import GatewayConfig, serve

    @contextlib.asynccontextmanager
    async def start(urls: list[str], wait_routable: bool = True, wait_tokenizers: bool = True, **overrides):
        cfg = dict(
            host="127.0.0.1",
            port=0,
            engines=urls,
            health_interval=0.1,
            health_timeout=1.0,
            metrics_interval=0.1,
            feed_retry_interval=0.1,
            retry_backoff=0.01,
            drain_timeout=0.5,
        )
        cfg.update(overrides)
        async with serve(GatewayConfig(**cfg)) as gw:
            if wait_routable:
                await until_async(
                    lambda: len(gw.pool.routable()) == len(urls),
                    lambda: f"every engine routable (only {[ep.url for ep in gw.pool.routable()]} of {urls})",
                )
            if wait_routable and wait_tokenizers:
                await until_async(lambda: not gw.tokenizers_pending(gw.pool.routable()), "the tokenizers' fetches")
            yield gw

    return start


@pytest.fixture
def dead_url() -> str:
    """A URL nothing listens on (its port held: no other process can be given it)."""
    return f"http://127.0.0.1:{reserve_port()}"


@pytest.fixture
def port() -> int:
    """A port held for a server the test starts on it."""
    return reserve_port()


@pytest.fixture(scope="session")
def fake_engine_module():
    """tests/gateway/fake_engine.py as a module, for in-process engines (`build_app(FakeConfig(...))`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanoserve_tests_fake_engine", FAKE_ENGINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def local_engines(fake_engine_module):
    """`async with local_engines(FakeConfig options, ...) as urls:` fake engines in this process and event loop
    (no process start: for tests of the gateway's own logic, not of process faults)."""
    from aiohttp import web

    fake = fake_engine_module

    @contextlib.asynccontextmanager
    async def start(*configs: dict):
        runners = []
        try:
            for i, options in enumerate(configs):
                runner = web.AppRunner(fake.build_app(fake.FakeConfig(**{"name": f"e{i}", **options})))
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                runners.append(runner)
            yield [f"http://127.0.0.1:{r.addresses[0][1]}" for r in runners]
        finally:
            for runner in runners:
                await runner.cleanup()

    return start
