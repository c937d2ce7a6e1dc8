"""The model download the operator renders, run as the pod would run it (download_pod.py): the init
container's own command and env, against a fake Hugging Face endpoint (HF_ENDPOINT) that serves a gated repo
to its token only."""

import asyncio
import hashlib

from aiohttp import web
from download_pod import DownloadPod, download_container

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


def run_download(init: dict, tmp_path, secrets: dict[str, str], seen: list) -> tuple[int, str]:
    """The container run as its pod would (download_pod.py), HF_ENDPOINT at the fake hub."""

    async def main():
        runner = web.AppRunner(fake_hub(seen))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        hub = {"HF_ENDPOINT": f"http://127.0.0.1:{runner.addresses[0][1]}"}
        proc = DownloadPod(init, tmp_path).start(secrets, hub)
        try:
            code = await asyncio.to_thread(proc.wait, 120)
        finally:
            await runner.cleanup()
        return code, proc.stderr.read() if proc.stderr else ""

    return asyncio.run(main())


def test_a_gated_repo_downloads_with_the_token_from_its_secret(tmp_path):
    init = download_container({"model": {"name": "org/gated", "tokenSecret": "hf"}})
    seen: list = []
    code, err = run_download(init, tmp_path, {"hf/token": TOKEN}, seen)
    assert code == 0, err
    for name, data in FILES.items():
        assert (tmp_path / "model" / "org" / "gated" / name).read_bytes() == data
    assert seen and all(auth == f"Bearer {TOKEN}" for _, _, auth in seen)


def test_without_the_token_the_gated_download_fails_and_the_pod_does_not_start(tmp_path):
    init = download_container({"model": {"name": "org/gated"}})
    assert "HF_TOKEN" not in {e["name"] for e in init["env"]}
    seen: list = []
    code, err = run_download(init, tmp_path, {}, seen)
    assert code != 0 and "401" in err
    assert not (tmp_path / "model" / "org" / "gated" / "config.json").exists()
