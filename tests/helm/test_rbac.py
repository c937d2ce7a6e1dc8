"""Least privilege: the chart's RBAC against the API calls the operator really made (chart_install.py).

The emulator enforces no RBAC, so every call goes through and is recorded. Each call must be allowed by
the rules bound to the chart's ServiceAccount, and each permission granted must be used by some call,
be needed to grant the gateways' Roles (Kubernetes lets a subject grant only what it holds), or be
listed in UNEXERCISED with the reason the run cannot show it.
"""

from rbac_rules import Call, allowed, expand, grants

UNEXERCISED = {
    # kopf posts Events only for handler errors (settings.posting.level = WARNING); none happen here.
    ("create", "", "events")
}


def granted(installed) -> list:
    ns, name = installed.service_account
    return grants(installed.objects, name, ns)


def needed(installed) -> set[Call]:
    """What the operator did, plus what the Roles it created for gateways grant, in their namespaces."""
    escalation = {
        Call(v, g, r, role["metadata"]["namespace"], n)
        for role in installed.gateway_roles
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
        for n in rule.get("resourceNames", [None])
    }
    assert escalation, "the operator created no gateway Role: the run exercised less than it should"
    return set(installed.operator_calls) | escalation


def test_every_call_the_operator_makes_is_allowed(installed):
    rules = granted(installed)
    denied = sorted({c for c in needed(installed) if not allowed(rules, c)}, key=str)
    assert not denied, f"the chart's RBAC denies calls the operator makes: {denied}"


def test_every_permission_granted_is_used(installed):
    # By verb and resource: every watched namespace gets the same Role, and the run's CRs in some
    # namespaces don't exercise everything (which namespaces get Roles is test_chart's business).
    used = {(c.verb, c.group, c.resource) for c in needed(installed)} | UNEXERCISED
    unused = sorted({g[:3] for g in expand(granted(installed)) if g[:3] not in used})
    assert not unused, f"the chart grants permissions the operator never uses: {unused}"


def test_unexercised_permissions_are_still_unexercised(installed):
    # Once a run does exercise one, it belongs to the checked calls, not to this list.
    used = {(c.verb, c.group, c.resource) for c in installed.operator_calls}
    assert not UNEXERCISED & used


def test_no_wildcards(installed):
    for _, rule in granted(installed):
        assert "*" not in rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", [])


def test_only_the_charts_subject_is_bound(installed):
    ns, name = installed.service_account
    for b in (o for o in installed.objects if o["kind"].endswith("Binding")):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
