"""Fixtures for gateway tests: a tiny tokenizer folder, fake engine processes, an in-process gateway.

Everything listens on 127.0.0.1. Engines are started through `spawn_engines(n, **options)`, which returns
objects with `.url`, `.kill()` and `.restart()`; a fixture of the same shape can start real engine servers.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s")
            time.sleep(0.05)


class FakeEngineProcess:
    """tests/gateway/fake_engine.py in a subprocess on a fixed port (so a restart keeps its URL)."""

    def __init__(self, name: str, options: dict) -> None:
        self.name, self.options = name, options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [sys.executable, str(FAKE_ENGINE), "--port", str(self.port), "--name", self.name]
        for k, v in self.options.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.proc = subprocess.Popen(args, env={**os.environ, "PYTHONSAFEPATH": "1"})

    def wait(self) -> None:
        wait_http(self.url + "/health")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.wait()


@pytest.fixture
def spawn_engines():
    started: list[FakeEngineProcess] = []

    def spawn(n: int, **options) -> list[FakeEngineProcess]:
        engines = [FakeEngineProcess(f"e{len(started) + i}", options) for i in range(n)]
        for e in engines:  # start all, then wait: they boot in parallel
            e.start()
        started.extend(engines)
        for e in engines:
            e.wait()
        return engines

    yield spawn
    for e in started:
        e.kill()


@pytest.fixture
def start_gateway():
    """`async with start_gateway(urls, **config) as gw:` serves a gateway on a free port (gw.url), with
    fast health checks, and waits until every engine is routable."""
    from nanoserve.gateway import GatewayConfig, serve

    @contextlib.asynccontextmanager
    async def start(urls: list[str], wait_routable: bool = True, **overrides):
        cfg = dict(host="127.0.0.1", port=0, engines=urls, health_interval=0.1, health_timeout=1.0,
                   metrics_interval=0.1, feed_retry_interval=0.1, retry_backoff=0.01, drain_timeout=0.5)
        cfg.update(overrides)
        async with serve(GatewayConfig(**cfg)) as gw:
            if wait_routable:
                await wait_until(lambda: len(gw.pool.routable()) == len(urls))
            yield gw
    return start


async def wait_until(predicate, timeout: float = 20.0) -> None:
    """Poll `predicate` until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.fixture
def until():
    return wait_until


@pytest.fixture
def dead_url() -> str:
    """A URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def http_ready():
    """Wait (bounded) until a URL answers."""
    return wait_http


@pytest.fixture(scope="session")
def fake_engine_module():
    """tests/gateway/fake_engine.py as a module, for in-process engines (`build_app(FakeConfig(...))`)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("nanoserve_tests_fake_engine", FAKE_ENGINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
