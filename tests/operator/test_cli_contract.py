"""The rendered containers' command lines parse with the real engine and gateway CLIs."""

import argparse

import pytest
from crd_schema import default_spec
from test_render import SPECS

from nanoserve.operator.engine import DRAIN_SECONDS
from nanoserve.operator.render import render


def container(spec: dict, deployment: str) -> tuple[dict, dict]:
    objs = {o["metadata"]["name"]: o for o in render("demo", "ml", default_spec(spec)) if o["kind"] == "Deployment"}
    pod = objs[deployment]["spec"]["template"]["spec"]
    return pod["containers"][0], pod


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_gateway_args_parse(spec):
    cli = pytest.importorskip("nanoserve.gateway.cli")
    c, _ = container(spec, "demo-gateway") if default_spec(spec)["gateway"]["enabled"] else (None, None)
    if c is None:
        pytest.skip("no gateway")
    assert c["command"][-1] == "gateway"
    args = cli.build_parser().parse_args(c["args"])
    assert (args.service, args.namespace, args.policy) == ("demo-engine", "ml", default_spec(spec)["gateway"]["policy"])
    assert args.port == c["ports"][0]["containerPort"]
    assert args.model is None  # no tokenizer flag: the gateway fetches the engines' own
    config = cli.config_from_args(args)
    workers = default_spec(spec)["gateway"]["workers"]
    assert config.workers == workers and c["resources"]["requests"]["cpu"] == f"{500 * workers}m"
    assert (
        c["lifecycle"]["preStop"]["sleep"]["seconds"] + config.drain_timeout
        <= container(spec, "demo-gateway")[1]["terminationGracePeriodSeconds"]
    )


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_engine_args_parse(spec):
    try:
        from nanoserve.engine_pod import cli
    except ImportError as e:  # the engine's deps (torch) are not installed here
        pytest.skip(f"engine CLI not importable: {e}")
    c, pod = container(spec, "demo-engine")
    assert c["command"][-1] == "serve"
    parser = argparse.ArgumentParser()
    cli.add_engine_args(parser)
    cli.add_server_args(parser)
    args = parser.parse_args(c["args"])
    assert args.port == c["ports"][0]["containerPort"]
    assert args.tensor_parallel_size == default_spec(spec)["tensorParallelSize"]
    # After the preStop pause, SIGTERM starts the engine's drain; the kubelet must wait for it.
    assert DRAIN_SECONDS + args.drain_timeout <= pod["terminationGracePeriodSeconds"]
