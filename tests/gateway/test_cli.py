"""The command line: arguments to config, and a real process that serves and drains on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from procs import wait_http

from nanoserve.gateway.cli import build_parser, config_from_args
from nanoserve.gateway.config import GatewayConfig


def parse(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_arguments_reach_the_config():
    cfg = parse(
        [
            "--engine",
            "http://a:1",
            "--engine",
            "http://b:2",
            "--port",
            "9000",
            "--policy",
            "least-loaded",
            "--cache-threshold",
            "0.5",
            "--balance-abs-threshold",
            "3",
            "--model",
            "/m",
        ]
    )
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


def test_module_serves_and_exits_cleanly_on_sigterm(dead_url, port):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoserve.gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--engine",
            dead_url,
            "--log-level",
            "WARNING",
        ],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        with pytest.raises(urllib.error.HTTPError) as e:  # its only engine is down
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert e.value.code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_fault_and_auth_flags_reach_the_config(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# client keys\nkey-c\n\n  key-d  \nkey-a\n")
    engine_key = tmp_path / "engine-key"
    engine_key.write_text("sekret\n")
    monkeypatch.setenv("NANOSERVE_GATEWAY_API_KEYS", "key-e, ,key-f")
    cfg = parse(
        [
            "--engine",
            "http://a:1",
            "--api-key",
            "key-a",
            "--api-key",
            "key-b",
            "--api-key-file",
            str(keys),
            "--engine-api-key-file",
            str(engine_key),
            "--public-metrics",
            "--first-byte-timeout",
            "7",
            "--breaker-threshold",
            "3",
            "--breaker-cooldown",
            "0.5",
            "--breaker-max-cooldown",
            "9",
            "--max-body-bytes",
            "1000",
        ]
    )
    assert cfg.api_keys == ["key-a", "key-b", "key-e", "key-f", "key-c", "key-d"]
    assert cfg.engine_api_key == "sekret" and cfg.public_metrics
    assert (
        cfg.first_byte_timeout,
        cfg.breaker_threshold,
        cfg.breaker_cooldown,
        cfg.breaker_max_cooldown,
        cfg.max_body_bytes,
    ) == (7, 3, 0.5, 9, 1000)
    monkeypatch.delenv("NANOSERVE_GATEWAY_API_KEYS")
    default = GatewayConfig()
    cfg = parse(["--engine", "http://a:1"])
    assert cfg.api_keys == [] and not cfg.public_metrics
    assert (cfg.first_byte_timeout, cfg.breaker_threshold) == (default.first_byte_timeout, default.breaker_threshold)
    with pytest.raises(SystemExit):
        parse(["--engine", "http://a:1", "--api-key-file", str(tmp_path / "missing")])


# Flags derived from the GatewayConfig dataclass (common/flags.py): the CLI can set every field of the config.


def test_every_config_field_is_a_flag():
    import dataclasses

    from nanoserve.gateway.config import RoutingConfig

    args = build_parser().parse_args([])
    for cls in (GatewayConfig, RoutingConfig):
        for f in dataclasses.fields(cls):
            assert f.name == "routing" or hasattr(args, f.name), f.name  # routing: its fields are the flags


def test_config_round_trips_through_argv(monkeypatch):
    """GatewayConfig -> gateway_argv (what the operator renders) -> the parser -> the same GatewayConfig."""
    import dataclasses

    from config_flags import changed_settings

    from nanoserve.gateway.config import gateway_argv

    monkeypatch.delenv("NANOSERVE_GATEWAY_API_KEYS", raising=False)
    monkeypatch.delenv("NANOSERVE_API_KEY", raising=False)
    changed = GatewayConfig(**changed_settings(GatewayConfig))
    assert parse(gateway_argv(dataclasses.asdict(changed))) == changed
    assert parse(["--engine", "http://a:1"]) == GatewayConfig(engines=["http://a:1"])
    flipped = dataclasses.replace(changed, public_metrics=False)
    assert parse(gateway_argv(dataclasses.asdict(flipped))) == flipped


def test_engine_api_key_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("NANOSERVE_API_KEY", "from-env")
    assert parse(["--engine", "http://a:1"]).engine_api_key == "from-env"
    assert parse(["--engine", "http://a:1", "--engine-api-key", "flag"]).engine_api_key == "flag"


def test_every_flag_has_help_with_its_default():
    from config_flags import help_entries

    parser = build_parser()
    entries = help_entries(parser.format_help())
    assert entries.keys() == {a.option_strings[0] for a in parser._actions}
    for flag, entry in entries.items():
        if flag != "-h":
            assert "(default: " in entry, entry
    assert "(default: $NANOSERVE_API_KEY)" in entries["--engine-api-key"]  # not the key itself
    assert "(default: 0.3)" in entries["--cache-threshold"]
