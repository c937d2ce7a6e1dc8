"""The command line: arguments to config, and a real process that serves and drains on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from nanoserve.gateway.cli import build_parser, config_from_args
from nanoserve.gateway.config import GatewayConfig


def parse(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_arguments_reach_the_config():
    cfg = parse(["--engine", "http://a:1", "--engine", "http://b:2", "--port", "9000", "--policy",
                 "least-loaded", "--cache-threshold", "0.5", "--balance-abs-threshold", "3", "--model", "/m"])
    assert cfg.engines == ["http://a:1", "http://b:2"] and cfg.port == 9000 and cfg.model == "/m"
    assert cfg.policy == "least-loaded"
    assert (cfg.routing.cache_threshold, cfg.routing.balance_abs_threshold) == (0.5, 3)


def test_defaults_match_the_config_dataclass():
    cfg = parse(["--service", "engines", "--namespace", "llm"])
    default = GatewayConfig()
    assert (cfg.service, cfg.namespace) == ("engines", "llm")
    assert cfg.routing == default.routing and cfg.port == default.port and cfg.policy == default.policy


def test_engines_or_service_required():
    with pytest.raises(SystemExit):
        parse([])


def test_module_serves_and_exits_cleanly_on_sigterm(dead_url, port, http_ready):
    proc = subprocess.Popen([sys.executable, "-m", "nanoserve.gateway", "--host", "127.0.0.1", "--port", str(port),
                             "--engine", dead_url, "--log-level", "WARNING"],
                            env={**os.environ, "PYTHONSAFEPATH": "1"})
    try:
        http_ready(f"http://127.0.0.1:{port}/health")
        with pytest.raises(urllib.error.HTTPError) as e:  # its only engine is down
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert e.value.code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
