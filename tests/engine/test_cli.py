"""`nanoserve` as vLLM users call it: vLLM's flags at the values nanoserve has are accepted, others refused
naming the choices; --help shows every default; --version answers."""

import os
import subprocess
import sys

import pytest


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanoserve.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        timeout=60,
    )


def test_help_lists_vllms_flags_with_their_defaults():
    out = cli("serve", "--help")
    assert out.returncode == 0
    for flag in (
        "--kv-cache-dtype",
        "--generation-config",
        "--trust-remote-code",
        "--disable-log-requests",
        "--chat-template",
        "--block-size",
        "--enable-prefix-caching",
        "--seed",
    ):
        assert flag in out.stdout, flag
    assert "(default: auto)" in out.stdout


def test_a_value_nanoserve_does_not_have_is_refused_by_name():
    out = cli("serve", "--kv-cache-dtype", "fp8_e5m2")
    assert out.returncode == 2 and "invalid choice: 'fp8_e5m2'" in out.stderr and "--kv-cache-dtype" in out.stderr
    out = cli("serve", "--generation-config", "/some/folder")
    assert out.returncode == 2 and "invalid choice: '/some/folder'" in out.stderr


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("nanoserve ")


# Flags derived from the Config dataclass (common/flags.py): one definition of each engine setting.


def help_text(capsys, command: str) -> str:
    from nanoserve.cli import main

    try:
        main([command, "--help"])
    except SystemExit:
        pass
    return capsys.readouterr().out


def subparser(name: str):
    import argparse

    from nanoserve.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def names(parser) -> set[str]:
    """What --help lists each of the parser's arguments by."""
    return {a.option_strings[0] if a.option_strings else a.metavar or a.dest for a in parser._actions}


def parse_serve(argv: list[str]):
    from nanoserve.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_every_config_field_is_a_flag_or_derived():
    import dataclasses

    from nanoserve.engine_pod.config import Config

    args = parse_serve([])
    for f in dataclasses.fields(Config):
        assert hasattr(args, f.name) == f.init, f.name  # init=False: read from the model folder, or parsed
    assert {f.name for f in dataclasses.fields(Config) if not f.init} == {
        "hf_config",
        "eos_token_ids",
        "sampling_defaults",
        "speculative",  # speculative_config's JSON, parsed
    }


def test_config_settings_round_trip_through_argv():
    """Config settings -> engine_argv (what `nanoserve up` and the operator run) -> the serve parser -> the same."""
    import dataclasses

    from config_flags import changed_settings

    from nanoserve.engine_pod.cli import engine_kwargs
    from nanoserve.engine_pod.config import Config, engine_argv

    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.init}
    assert engine_kwargs(parse_serve([])) == defaults == engine_kwargs(parse_serve(engine_argv(defaults)))
    changed = changed_settings(Config)
    assert engine_kwargs(parse_serve(engine_argv(changed))) == changed
    flipped = {**changed, "enforce_eager": False, "enable_prefix_caching": True, "async_scheduling": True}
    assert engine_kwargs(parse_serve(engine_argv(flipped))) == flipped


def test_vllm_spellings_reach_the_config():
    from nanoserve.engine_pod.cli import engine_kwargs

    args = parse_serve(
        [
            "m",
            "-tp",
            "2",
            "--block-size",
            "32",
            "--no-enable-prefix-caching",
            "--dtype",
            "auto",
            "--kv-cache-dtype",
            "auto",
            "--generation-config",
            "vllm",
            "--trust-remote-code",
            "--disable-log-requests",
            "--seed",
            "3",
        ]
    )
    assert args.model_tag == "m"
    kwargs = engine_kwargs(args)
    assert (
        kwargs["tensor_parallel_size"],
        kwargs["kvcache_block_size"],
        kwargs["enable_prefix_caching"],
        kwargs["dtype"],
        kwargs["seed"],
    ) == (2, 32, False, "auto", 3)
    assert engine_kwargs(parse_serve(["--no-prefix-caching"]))["enable_prefix_caching"] is False


@pytest.mark.parametrize("command", ["serve", "generate", "up"])
def test_every_flag_has_help_with_its_default(capsys, command):
    from config_flags import help_entries

    entries = help_entries(help_text(capsys, command))
    assert entries.keys() == names(subparser(command))
    for flag, entry in entries.items():
        if flag != "-h":
            assert "(default: " in entry, entry
    assert "(default: the model's length: max_position_embeddings" in entries["--max-model-len"]
    if command == "serve":
        assert {"MODEL", "--host", "--api-key", "--chat-template"} <= entries.keys()
        assert "(default: cuda when available)" in entries["--device"]
    if command == "up":  # its own defaults
        assert "(default: cpu)" in entries["--device"] and "(default: 127.0.0.1)" in entries["--host"]


def test_a_bad_choice_is_refused_by_the_config_too():
    from nanoserve.engine_pod.config import Config
    from nanoserve.engine_pod.errors import ConfigError

    with pytest.raises(ConfigError, match="scheduling_policy must be one of fcfs, priority"):
        Config(scheduling_policy="lifo")
