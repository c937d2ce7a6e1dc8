"""The model download the operator renders, run as the pod would run it: the init container's own command
and env, against a fake Hugging Face endpoint (HF_ENDPOINT) that serves a gated repo to its token only."""

import asyncio
import hashlib
import os
import sys

from aiohttp import web
from crd_schema import default_spec

from nanoserve.operator.render import render

FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}'}
COMMIT, TOKEN = "c0ffee" * 6 + "c0fe", "hf_s3cret"


def fake_hub(seen: list) -> web.Application:
    """The three calls snapshot_download makes: the revision, its file tree, each file (HEAD, then GET)."""

    def allowed(request: web.Request) -> bool:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def revision(request):
        if not allowed(request):
            return web.json_response({"error": "gated repo: log in"}, status=401)
        return web.json_response({"id": "org/gated", "sha": COMMIT, "siblings": [{"rfilename": f} for f in FILES]})

    async def tree(request):
        if not allowed(request):
            return web.json_response({"error": "gated repo: log in"}, status=401)
        entries = [
            {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in FILES.items()
        ]
        return web.json_response(entries)

    async def resolve(request):
        if not allowed(request):
            return web.Response(status=401)
        data = FILES[request.match_info["path"]]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT}
        return web.Response(body=b"" if request.method == "HEAD" else data, headers=headers)

    app = web.Application()
    app.router.add_get("/api/models/{org}/{name}/revision/{rev}", revision)
    app.router.add_get("/api/models/{org}/{name}/tree/{rev}", tree)
    app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", resolve)
    return app


def download_container(spec: dict) -> dict:
    objs = render("demo", "ml", default_spec(spec))
    (deploy,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "demo-engine"]
    (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
    return init


def run_download(init: dict, tmp_path, secrets: dict[str, str], seen: list) -> tuple[int, str]:
    """The container's command with its env (secret references resolved from `secrets`), its /models and
    /cache under tmp_path, HF_ENDPOINT at the fake hub."""

    def local(value: str) -> str:
        return value.replace("/models", str(tmp_path / "models")).replace("/cache", str(tmp_path / "cache"))

    env = {"PATH": os.environ["PATH"], "PYTHONSAFEPATH": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for e in init["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = secrets[f"{ref['name']}/{ref['key']}"] if ref else local(e["value"])

    async def main():
        runner = web.AppRunner(fake_hub(seen))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        command = [sys.executable if init["command"][0] == "python" else init["command"][0]]
        command += [local(a) for a in init["command"][1:]]
        proc = await asyncio.create_subprocess_exec(*command, env=env, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        await runner.cleanup()
        return proc.returncode, err.decode()

    return asyncio.run(main())


def test_a_gated_repo_downloads_with_the_token_from_its_secret(tmp_path):
    init = download_container({"model": {"name": "org/gated", "tokenSecret": "hf"}})
    seen: list = []
    code, err = run_download(init, tmp_path, {"hf/token": TOKEN}, seen)
    assert code == 0, err
    for name, data in FILES.items():
        assert (tmp_path / "models" / "org" / "gated" / name).read_bytes() == data
    assert seen and all(auth == f"Bearer {TOKEN}" for _, _, auth in seen)


def test_without_the_token_the_gated_download_fails_and_the_pod_does_not_start(tmp_path):
    init = download_container({"model": {"name": "org/gated"}})
    assert "HF_TOKEN" not in {e["name"] for e in init["env"]}
    seen: list = []
    code, err = run_download(init, tmp_path, {}, seen)
    assert code != 0 and "401" in err
    assert not (tmp_path / "models" / "org" / "gated" / "config.json").exists()
