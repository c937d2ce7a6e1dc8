"""A minimal /openapi/v3 for the emulated API server, so Helm's install can skip client-side validation.

Helm 4 (through helm-sdkpy) asks the server whether each kind's PATCH takes `fieldValidation`; with no
/openapi at all it falls back to downloading the full v2 schema (protobuf) and fails. This document
answers "yes, the server validates" for every kind the emulator knows, so Helm sends objects as they
are. The chart's objects are validated against the real 1.37 schemas by test_template.py instead.
"""

import aiohttp.web
import kmock
from emulator_thread import EmulatorThread
from kube_emulator import Emulator


def _gv_path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def gv_document(emulator: Emulator, group: str, version: str) -> dict:
    paths = {}
    for res, info in emulator.resources.items():
        if (res.group, res.version) != (group, version) or "/" in res.plural or not info.kind:
            continue
        scope = "namespaces/{namespace}/" if info.namespaced else ""
        gvk = {"group": group, "version": version, "kind": info.kind}
        paths[f"/{_gv_path(group, version)}/{scope}{res.plural}/{{name}}"] = {
            "patch": {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }
        }
    return {"openapi": "3.0.0", "info": {"title": "emulator", "version": version}, "paths": paths}


class OpenAPIEmulator(Emulator):
    async def _serve(self, request):
        path = request.url.path.strip("/")
        if path == "openapi/v3":
            gvs = {(r.group, r.version) for r in self.resources}
            return aiohttp.web.json_response(
                {"paths": {_gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{_gv_path(g, v)}"} for g, v in gvs}}
            )
        if path.startswith("openapi/v3/"):
            parts = path.removeprefix("openapi/v3/").split("/")
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            return aiohttp.web.json_response(gv_document(self, group, version))
        return await super()._serve(request)


class OpenAPIEmulatorThread(EmulatorThread):
    """The operator tests' emulator thread, serving the emulator above."""

    async def _start(self) -> None:
        self.emulator = OpenAPIEmulator()
        await self.emulator.__aenter__()
        self.server = kmock.Server(self.emulator)
        await self.server.__aenter__()
        self.url = f"http://127.0.0.1:{self.server.port}"
