"""The Dockerfiles, checked without a Docker engine: hadolint, and their commands against the real CLIs."""

import argparse
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from dockerfile_parse import command, instructions, last
from helm_tool import REPO

from nanoserve.operator.security import USER_ID

DOCKER = REPO / "docker"
IMAGES = {name: DOCKER / f"{name}.Dockerfile" for name in ("engine", "gateway", "operator")}
BIN = pathlib.Path(sys.executable).parent


@pytest.mark.parametrize("path", IMAGES.values(), ids=IMAGES)
def test_hadolint_finds_nothing(path):
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", IMAGES.values(), ids=IMAGES)
def test_runs_as_the_pods_non_root_user(path):
    # The operator's pods run as USER_ID with a read-only root: the image's user must be the same.
    assert last(path, "USER") == f"{USER_ID}:{USER_ID}"


@pytest.mark.parametrize("path", IMAGES.values(), ids=IMAGES)
def test_copied_paths_exist(path):
    for op, value in instructions(path):
        if op == "COPY" and "--from=" not in value:
            sources = [a for a in value.split()[:-1] if not a.startswith("--")]
            assert all((REPO / s).exists() for s in sources), value
    ignored = (REPO / ".dockerignore").read_text()
    for op, value in instructions(path):
        if op == "COPY" and "--from=" not in value:
            for s in (a for a in value.split()[:-1] if not a.startswith("--")):
                assert f"!{s.split('/')[0]}" in ignored, f"{s} is excluded from the build context"


def test_gateway_image_installs_no_torch():
    installs = " ".join(v for op, v in instructions(IMAGES["gateway"]) if op == "RUN" and "pip install" in v)
    assert "torch" not in installs and "[gateway]" in installs and "[engine]" not in installs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith("torch") for d in extras["gateway"])


def test_engine_command_is_nanoserve_serve():
    from nanoserve.engine_pod import cli
    from nanoserve.operator.engine import render_engine_deployment
    from nanoserve.operator.names import ENGINE_PORT

    cmd = command(IMAGES["engine"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[:2] == ["nanoserve", "serve"] and scripts["nanoserve"] == "nanoserve.cli:main"
    parser = argparse.ArgumentParser()
    cli.add_engine_args(parser)
    cli.add_server_args(parser)
    assert parser.parse_args(cmd[2:]).port == ENGINE_PORT
    # The operator's engine pods override the command with the same one.
    from crd_schema import default_spec

    pod = render_engine_deployment("demo", default_spec({}))["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == cmd[:2]
    assert f"EXPOSE {ENGINE_PORT}" in {f"{o} {v}" for o, v in instructions(IMAGES["engine"])}


def test_gateway_command_is_nanoserve_gateway():
    from nanoserve.gateway.cli import build_parser
    from nanoserve.operator.gateway import render_gateway_deployment
    from nanoserve.operator.names import GATEWAY_PORT

    cmd = command(IMAGES["gateway"])
    assert cmd[:2] == ["nanoserve", "gateway"]
    assert build_parser().parse_args(cmd[2:]).port == GATEWAY_PORT
    from crd_schema import default_spec

    pod = render_gateway_deployment("demo", "ml", default_spec({}))["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == cmd[:2]


def test_nanoserve_gateway_runs_without_the_engine(tmp_path):
    """The gateway image has no torch; its `nanoserve gateway` imports nothing of the engine at all."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch in the gateway image')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONSAFEPATH": "1"}
    code = (
        "import sys\nfrom nanoserve.cli import main\ntry:\n    main(['gateway', '--help'])\nexcept SystemExit:\n"
        "    pass\nprint('ENGINE', sorted(m for m in sys.modules if m.startswith('nanoserve.engine_pod')))"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--service" in run.stdout, run.stderr
    assert "ENGINE []" in run.stdout


def test_operator_command_is_kopf_run_of_the_handlers():
    import kopf.cli

    cmd = command(IMAGES["operator"])
    assert cmd[:2] == ["kopf", "run"]
    ctx = kopf.cli.run.make_context("run", cmd[2:])  # parses the flags, runs nothing
    assert ctx.params["modules"] == ("nanoserve.operator.handlers",)
    assert ctx.params["standalone"] and ctx.params["clusterwide"]
    __import__("nanoserve.operator.handlers")  # the module kopf is told to load


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["ml"]}], ids=["cluster-wide", "namespaced"])
def test_chart_runs_the_operator_image_as_built(helm, values):
    import kopf.cli

    (dep,) = [o for o in helm.template(values) if o["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == command(IMAGES["operator"])[:2]
    ctx = kopf.cli.run.make_context("run", list(c["args"]))
    assert ctx.params["modules"] == ("nanoserve.operator.handlers",) and not ctx.params["standalone"]
    assert ctx.params["peering_name"] == "nanoserve"  # the chart's replicas peer (the image alone runs standalone)
    assert ctx.params["clusterwide"] == (not values) and list(ctx.params["namespaces"]) == values.get(
        "watchNamespaces", []
    )
