"""Several operator replicas, one at work: kopf's peering, and who of the replicas may resync.

`kopf run --peering=NAME` (the chart's): every replica writes a keep-alive, `{priority, lifetime, lastseen}`
under its identity (`$POD_ID`, the pod's name in the chart), into the status of the peering object NAME: a
`ClusterKopfPeering` for an operator of all namespaces, a `KopfPeering` in each namespace of one that lists
them. kopf's rule (kopf/_core/engines/peering.py): a replica pauses while a live peer has a higher priority,
and every replica pauses while two live ones have the same priority. So each replica takes a priority of its
own, and the oldest works: minus its start time (milliseconds, times 1000, plus a random tie-break). A newer
replica (a rolling update's, a restarted one) waits; a peer that exits says so (kopf removes its entry) and
the next takes over at once; one killed (SIGKILL, a lost node) is dead once `lastseen + lifetime` has passed
(`NANOSERVE_PEERING_LIFETIME_SECONDS`, kopf's default 60; keep-alives go 5 to 10 s sooner).
The priorities stay below kopf's own: `kopf run --dev` (666) and `kopf freeze` (100) pause every replica.

kopf pauses only its own handlers; the resync loop (handlers.py) is ours, so it asks `active` first.
"""

from __future__ import annotations

import datetime
import os
import random
import time

import kopf

from nanoserve.operator import kube

API = "/apis/kopf.dev/v1"
DEFAULT_LIFETIME = 60  # kopf's, also for a peer that writes none


def start_priority(now_ms: int | None = None, tie_break: int | None = None) -> int:
    """This replica's priority: the earlier it started, the higher. Exact in a float (below 2**53)."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return -(now_ms * 1000 + (random.randrange(1000) if tie_break is None else tie_break))


def configure(settings: kopf.OperatorSettings) -> None:
    """Takes a priority unless one was given (`kopf run --priority`, `--dev`), and the lifetime from the env."""
    if settings.peering.priority == 0:
        settings.peering.priority = start_priority()
    if lifetime := os.environ.get("NANOSERVE_PEERING_LIFETIME_SECONDS"):
        settings.peering.lifetime = int(lifetime)


def _parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def blockers(status: dict, priority: int, identity: str | None, now: datetime.datetime | None = None) -> list[str]:
    """The live peers in a peering object's status that pause a replica of this priority and identity
    (kopf's rule). An identity not known (no $POD_ID): an entry of the same priority is taken to be its own."""
    now = now or datetime.datetime.now(datetime.UTC)
    out = []
    for peer, info in (status or {}).items():
        if not isinstance(info, dict) or peer == identity:
            continue
        lastseen = _parse_time(info["lastseen"]) if info.get("lastseen") else now
        if lastseen + datetime.timedelta(seconds=int(info.get("lifetime", DEFAULT_LIFETIME))) <= now:
            continue  # dead: it lapsed
        theirs = int(info.get("priority", 0))
        if theirs > priority or (theirs == priority and identity is not None):
            out.append(peer)
    return out


def peering_url(settings: kopf.OperatorSettings, namespace: str | None) -> str:
    name = settings.peering.name
    if settings.peering.clusterwide:
        return f"{API}/clusterkopfpeerings/{name}"
    return f"{API}/namespaces/{namespace}/kopfpeerings/{name}"


def active(settings: kopf.OperatorSettings, namespaces: set[str]) -> bool:
    """Whether kopf lets this replica work: no peering, or no live peer before it in the peering object
    (for a namespaced operator, the one in each of `namespaces`: those of the InferenceServices it is about
    to resync; kopf pauses for any namespace it serves, but every replica writes to all of them alike).
    Without the object, kopf pauses when peering is mandatory (`--peering`) and runs otherwise."""
    if settings.peering.standalone:
        return True
    identity = os.environ.get("POD_ID")  # kopf's own identity, where it is set
    for ns in [None] if settings.peering.clusterwide else sorted(namespaces):
        obj = kube.get_url(peering_url(settings, ns))
        if obj is None:
            if settings.peering.mandatory:
                return False
            continue
        if blockers(obj.get("status") or {}, settings.peering.priority, identity):
            return False
    return True
