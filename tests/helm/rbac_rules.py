"""A small RBAC authorizer: which API calls a ServiceAccount's Roles and ClusterRoles allow.

Enough to compare the chart's RBAC with the calls the operator really makes (the emulator enforces no RBAC).
"""

from typing import NamedTuple

WRITE_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


class Call(NamedTuple):
    verb: str
    group: str
    resource: str  # "deployments" or "inferenceservices/status"
    namespace: str | None  # None: a cluster-scoped call (or one across all namespaces)
    name: str | None = None  # the object's, for a call on one object (rules may name the objects they allow)


def call_of(method: str, path: str, params: dict) -> Call | None:
    """The RBAC attributes of one request; None for non-resource URLs (discovery, /version, /openapi)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    if method == "GET":
        verb = "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = WRITE_VERBS[method]
    return Call(verb, group, f"{resource}/{sub}" if sub else resource, namespace, name)


def calls_of(requests: list[tuple[str, str, dict, str, str]], who: set[int]) -> list[Call]:
    """The calls of the requests at indexes `who`, from (method, path, params, content type, body's name)
    of every client, in order.

    A server-side apply that creates its object needs `create` as well as `patch` (the API server checks
    both), so the objects in existence are tracked through everyone's writes.
    """
    existing, calls = set(), []
    for i, (method, path, params, content_type, body_name) in enumerate(requests):
        call = call_of(method, path, params)
        if call is None:
            continue
        key = path.rstrip("/")
        creates = (
            method == "PATCH" and "apply-patch" in content_type and key not in existing and "/" not in call.resource
        )
        if method in ("PATCH", "PUT"):
            existing.add(key)
        elif method == "POST":
            existing.add(f"{key}/{body_name}")
        elif method == "DELETE":
            existing.discard(key)
        if i in who:
            calls += [call, call._replace(verb="create")] if creates else [call]
    return calls


def grants(objects: list[dict], sa_name: str, sa_namespace: str) -> list[tuple[str | None, dict]]:
    """(namespace or None for everywhere, rule) for every rule bound to the ServiceAccount."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("rules", [])
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    out = []
    for b in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == sa_name and s.get("namespace") == sa_namespace
            for s in b.get("subjects", [])
        ):
            continue
        scope = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        ref = b["roleRef"]
        role_ns = scope if ref["kind"] == "Role" else None
        out += [(scope, rule) for rule in roles.get((ref["kind"], role_ns, ref["name"]), [])]
    return out


def rule_allows(rule: dict, call: Call) -> bool:
    def has(values, v):
        return v in values or "*" in values

    return (
        has(rule.get("apiGroups", []), call.group)
        and has(rule.get("resources", []), call.resource)
        and has(rule.get("verbs", []), call.verb)
        # resourceNames: only calls on those objects (a list, a watch or a create names none: denied)
        and ("resourceNames" not in rule or call.name in rule["resourceNames"])
    )


def allowed(granted: list[tuple[str | None, dict]], call: Call) -> bool:
    return any((scope is None or scope == call.namespace) and rule_allows(rule, call) for scope, rule in granted)


def expand(granted: list[tuple[str | None, dict]]) -> set[Call]:
    """Every (verb, group, resource, scope, name) the rules grant, one by one (name None: any)."""
    return {
        Call(v, g, r, scope, n)
        for scope, rule in granted
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
        for n in rule.get("resourceNames", [None])
    }
