"""`nanoserve` as vLLM users call it: vLLM's flags at the values nanoserve has are accepted, others refused
naming the choices; --help shows every default; --version answers."""
import os
import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoserve.engine_pod.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=60)


def test_help_lists_vllms_flags_with_their_defaults():
    out = cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--kv-cache-dtype", "--generation-config", "--trust-remote-code", "--disable-log-requests",
                 "--chat-template", "--block-size", "--enable-prefix-caching", "--seed"):
        assert flag in out.stdout, flag
    assert "(default: auto)" in out.stdout


def test_a_value_nanoserve_does_not_have_is_refused_by_name():
    out = cli("serve", "--kv-cache-dtype", "fp8")
    assert out.returncode == 2 and "invalid choice: 'fp8'" in out.stderr and "--kv-cache-dtype" in out.stderr
    out = cli("serve", "--generation-config", "auto")
    assert out.returncode == 2 and "invalid choice: 'auto'" in out.stderr


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("nanoserve ")
