"""kmock 0.8's KubernetesEmulator, patched just enough to behave like an API server for kopf and kubectl.

Each fix is small and named after the gap it closes (tests in test_emulator.py):
  namespaces    GET/POST /api/v1/namespaces[/NAME] crashed kmock's URL parser
  metadata      uid, resourceVersion, creationTimestamp, generation assigned and bumped (by status too, for a
                custom resource without a status subresource, such as kopf's peering objects)
  lists         List responses carry kind/apiVersion and the current resourceVersion
  discovery     core group-version is "v1", not "/v1"
  reasons       errors say NotFound / AlreadyExists / Invalid, as the real server does
  crds          a created CRD registers its resource (with subresources) and validates CRs (schema + CEL)
  apply/put     server-side apply creates missing objects; PUT replaces
  subresources  /status and /scale write only their part; the main resource ignores status
  selectors     labelSelector and fieldSelector filter lists and watches
  watches       streamed as application/json (client-go rejects octet-stream); a watch from a
                resourceVersion replays what happened since; "watch list" gets its closing bookmark
  deletes       one place for deletion: finalizers hold it, the last one removed completes it
  json-patch    a patch that does not apply (a failed "test" op) is a 422, not a 500
Not emulated: controllers (Deployments never get pods), garbage collection, RBAC, admission, SSA field ownership.
"""

import copy
import datetime
import re
import uuid

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from crd_schema import apply_defaults, validation_errors
from kmock._internal import enums, k8s, parsing
from kmock._internal.dicts import patch_dict

_parse_path = parsing.parse_path


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    # /api/v1/namespaces[/NAME[/status|finalize]] are namespace objects, not a namespaced resource.
    m = re.fullmatch(r"/api/v1/namespaces(?:/([^/]+))?(?:/(status|finalize))?/?", path)
    if m:
        return parsing.ParsedPath("", "v1", "namespaces", None, m.group(1), m.group(2))
    return _parse_path(path)


parsing.parse_path = _parse_path_with_namespaces  # rendering calls it through the module

REASONS = {404: "NotFound", 409: "AlreadyExists", 415: "UnsupportedMediaType", 422: "Invalid"}


def _strip_directives(patch):
    """Strategic-merge-patch directives ($setElementOrder/..., $patch) mean nothing to a JSON merge."""
    if isinstance(patch, dict):
        return {k: _strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    return patch


def _field(obj: dict, path: str) -> str | None:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def selected(obj: dict, params: dict) -> bool:
    """labelSelector and fieldSelector (metadata.name=x, status.phase!=y), as lists and watches filter."""
    fields = {k: _field(obj, k) for k in re.findall(r"([\w.]+)\s*!?==?", params.get("fieldSelector", ""))}
    return matches_selector(
        obj.get("metadata", {}).get("labels") or {}, params.get("labelSelector", "")
    ) and matches_selector({k: v for k, v in fields.items() if v is not None}, params.get("fieldSelector", ""))


def matches_selector(labels: dict, selector: str) -> bool:
    """Equality-based selectors: a=b, a==b, a!=b, a, !a (comma = and)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if m := re.fullmatch(r"([^!=]+?)\s*(==|=|!=)\s*(.*)", term):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _rv: int = attrs.field(default=0, init=False)  # the last resourceVersion handed out
    _log: list = attrs.field(factory=list, init=False)  # (resourceVersion, resource, event), for watches
    _schemas: dict = attrs.field(factory=dict, init=False)  # resource -> openAPIV3Schema
    _scale: dict = attrs.field(factory=dict, init=False)  # resource -> CRD's scale subresource
    served: list = attrs.field(factory=list, init=False)  # every request, in arrival order (for tests to read)

    def __attrs_post_init__(self) -> None:
        # Watch streams are JSON lines; kmock's default octet-stream makes client-go refuse them.
        # Registered before kmock's own watch reaction, so it is found first.
        self.fallback[enums.action.WATCH] << kmock.headers({"Content-Type": "application/json"}) << self._serve_watch
        super().__attrs_post_init__()
        self.resources.load_bundled()  # built-in kinds (k3s discovery) for kubectl and kopf
        self.resources["v1/namespaces"].subresources.update({"status", "finalize"})

    # ---- errors and discovery --------------------------------------------------------------
    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, k8s.KubernetesError) and exc.status in REASONS:
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "metadata": {},
                    "status": "Failure",
                    "code": exc.status,
                    "reason": REASONS[exc.status],
                    "message": exc.message,
                    "details": exc.details or {},
                },
                status=exc.status,
            )
        return await super()._render_error(exc)

    async def _serve_version(self, request):
        doc = await super()._serve_version(request)
        doc["groupVersion"] = doc["groupVersion"].lstrip("/")
        for r in doc["resources"]:
            if "/" in r["name"]:  # subresources have no short names or categories of their own
                r["shortNames"], r["categories"] = [], []
                r["kind"] = "Scale" if r["name"].endswith("/scale") else r["kind"]
        return doc

    # ---- reads ----------------------------------------------------------------------------
    async def _serve_list(self, request):
        doc = await super()._serve_list(request)
        info, res = self.resources[request.resource], request.resource
        doc["items"] = [o for o in doc["items"] if selected(o, request.params)]
        doc["kind"] = f"{info.kind or res.plural.capitalize()}List"
        doc["apiVersion"] = f"{res.group}/{res.version}".lstrip("/")
        doc["metadata"] = {"resourceVersion": str(self._rv)}
        return doc

    async def _serve_watch(self, request):
        yield b""  # headers out now: the stream exists even while nothing happens
        res, ns, params = request.resource, request.namespace, request.params

        def mine(obj: dict) -> bool:
            meta = obj.get("metadata", {})
            return (
                (ns is None or meta.get("namespace") == ns)
                and request.name in (None, meta.get("name"))
                and selected(obj, params)
            )

        since = params.get("resourceVersion", "")
        async with self._lock:  # snapshot and live position taken together: no event falls between
            mark = await self._buses[res].mark()
            if since in ("", "0") or params.get("sendInitialEvents") == "true":
                replay = [
                    {"type": "ADDED", "object": o.last.raw}
                    for (r, _, _), o in self._objects.items()
                    if r == res and not o.deleted
                ]
            else:  # a watch from a resourceVersion continues from there, as after a list or a GET
                replay = [e for rv, r, e in self._log if r == res and rv > int(since)]
            rv = str(self._rv)
        try:
            for event in replay:
                if mine(event["object"]):
                    yield event
            if params.get("sendInitialEvents") == "true":  # "watch list": a bookmark ends the replay
                info = self.resources[res]
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": info.kind,
                        "apiVersion": f"{res.group}/{res.version}".lstrip("/"),
                        "metadata": {"resourceVersion": rv, "annotations": {"k8s.io/initial-events-end": "true"}},
                    },
                }
            async for event in self._buses[res].stream(since=mark):
                if mine(event.get("object", {})):
                    yield event
        finally:
            await self._buses[res].unmark(mark)

    async def _serve_fetch(self, request):
        obj = await super()._serve_fetch(request)
        if request.subresource == "scale":
            return self._as_scale(obj)
        return obj

    async def _handle(self, request):
        # kmock finds each request's reaction by scanning its whole request log for it: the cost of a request
        # grew with every request before it (most of the operator tests' CPU). Its log keeps only requests
        # in flight; `served` keeps them all.
        self.served.append(request)
        try:
            return await self._serve(request)
        finally:
            self._requests[:] = [r for r in self._requests if r is not request]

    # ---- writes ---------------------------------------------------------------------------
    async def _serve(self, request):
        is_write = request.method in (enums.method.POST, enums.method.PATCH, enums.method.PUT)
        is_delete = request.method == enums.method.DELETE and request.name
        if request.resource is None or not (is_write or is_delete):
            return await super()._handle(request)
        async with self._lock:
            obj, event = self._delete(request) if is_delete else self._write(request)
            if event:  # logged for watches that resume from a resourceVersion
                self._log.append((int(event["object"]["metadata"]["resourceVersion"]), request.resource, event))
                await self._buses[request.resource].put(event)
        return aiohttp.web.json_response(obj, status=201 if event and event["type"] == "ADDED" else 200)

    def _delete(self, request) -> tuple[dict, dict | None]:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise k8s.KubernetesError(404, message=f"{request.resource.plural} {request.name!r} not found")
        old = self._objects[key].last.raw
        if old["metadata"].get("deletionTimestamp"):
            return old, None
        self._rv += 1
        meta = {**old["metadata"], "resourceVersion": str(self._rv)}
        if meta.get("finalizers"):  # finalizers hold the object until they are removed
            meta["deletionTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._objects[key].history.append(new := {**old, "metadata": meta})
            return new, {"type": "MODIFIED", "object": new}
        self._objects[key].delete()
        return old, {"type": "DELETED", "object": {**old, "metadata": meta}}

    def _write(self, request) -> tuple[dict, dict | None]:
        res, sub = request.resource, request.subresource
        if "protobuf" in request.headers.get("Content-Type", ""):  # clients fall back to JSON on a 415
            raise k8s.KubernetesError(415, message="the emulator speaks JSON only")
        data = request.data if request.data is not None else yaml.safe_load(request.text or "{}")
        data = _strip_directives(copy.deepcopy(data))  # strategic-merge directives: noise to a merge
        name = request.name or data.get("metadata", {}).get("name")
        key = (res, request.namespace, name)
        old = self._objects[key].last.raw if key in self._objects and not self._objects[key].deleted else None
        if request.method == enums.method.POST:
            if old is not None:
                raise k8s.KubernetesError(409, message=f"{res.plural} {name!r} already exists")
            new = data
        elif old is None:  # only server-side apply creates on PATCH; PUT of a missing object is a 404
            if "apply-patch" not in request.headers.get("Content-Type", "") or sub:
                raise k8s.KubernetesError(404, message=f"{res.plural} {name!r} not found")
            new = data
        elif sub == "scale":
            new = {**old, "spec": {**old.get("spec", {}), "replicas": data["spec"]["replicas"]}}
        else:
            try:
                new = data if request.method == enums.method.PUT else patch_dict(old, data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                # The apiserver answers a JSON patch that does not apply (a failed "test" op included) with 422:
                # kopf's finalizer patches test the resourceVersion and retry a 422 on its next cycle.
                raise k8s.KubernetesError(422, message=f"the patch does not apply: {e}") from e
            # With a status subresource, the main resource ignores status and /status ignores the rest.
            if sub == "status":
                new = {**old, "status": new.get("status")}
            elif "status" in self.resources[res].subresources:
                new = {k: v for k, v in new.items() if k != "status"} | (
                    {"status": old["status"]} if "status" in old else {}
                )
        if res == kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions"):
            new = self._register_crd(new)
        new = self._stamp(res, request.namespace, name, old, new)
        result = self._as_scale(new) if sub == "scale" else new
        if request.params.get("dryRun") or new == old:
            return result, None
        if old is None:
            self._objects[key] = new
        else:
            self._objects[key].history.append(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._objects[key].delete()  # the last finalizer is gone: the deletion completes
            return result, {"type": "DELETED", "object": new}
        return result, {"type": "ADDED" if old is None else "MODIFIED", "object": new}

    def _stamp(self, res, namespace, name, old, new) -> dict:
        """Server-owned metadata, defaulting and validation, as the apiserver does on every write."""
        if res in self._schemas:
            new = apply_defaults(self._schemas[res], new)
            if errors := validation_errors(self._schemas[res], new):
                kind = self.resources[res].kind
                causes = [dict(zip(("field", "message"), e.split(": ", 1)), reason="FieldValueInvalid") for e in errors]
                raise k8s.KubernetesError(
                    422,
                    message=f'{kind}.{res.group} "{name}" is invalid: ' + "; ".join(errors),
                    details={"name": name, "group": res.group, "kind": kind, "causes": causes},
                )
        meta = dict(new.get("metadata") or {}, name=name)
        if namespace:
            meta["namespace"] = namespace
        before = (old or {}).get("metadata", {})
        meta["uid"] = before.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = before.get("creationTimestamp") or datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        # A custom resource without a status subresource counts every change but metadata (kopf's peering
        # objects); the others leave status out, as the built-in kinds do.
        custom_plain = res in self._schemas and "status" not in self.resources[res].subresources
        ignored = ("metadata",) if custom_plain else ("metadata", "status")
        changed = old is None or {k: v for k, v in old.items() if k not in ignored} != {
            k: v for k, v in new.items() if k not in ignored
        }
        meta["generation"] = before.get("generation", 0) + 1 if changed else before.get("generation", 1)
        meta["resourceVersion"] = before.get("resourceVersion", "")
        if old is None or {**new, "metadata": meta} != old:  # a no-op write changes nothing
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
        return {**new, "metadata": meta}

    def _register_crd(self, crd: dict) -> dict:
        spec, names = crd["spec"], crd["spec"]["names"]
        for v in spec["versions"]:
            res = kmock.resource(spec["group"], v["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec["scope"] == "Namespaced",
                shortnames=names.get("shortNames", []),
                categories=names.get("categories", []),
                subresources=list(v.get("subresources", {})),
                verbs=["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            )
            self._schemas[res] = v["schema"]["openAPIV3Schema"]
            self._scale[res] = v.get("subresources", {}).get("scale")
        conditions = [{"type": t, "status": "True", "reason": t} for t in ("NamesAccepted", "Established")]
        return {**crd, "status": {"conditions": conditions, "acceptedNames": names}}

    def _as_scale(self, obj: dict) -> dict:
        status = obj.get("status") or {}
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion") if k in obj["metadata"]
            },
            "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
            "status": {"replicas": status.get("replicas", 0), "selector": status.get("selector", "")},
        }
