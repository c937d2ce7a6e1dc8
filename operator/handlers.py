"""kopf handlers: thin glue between InferenceService events and reconcile().

Run: kopf run -m nanoserve.operator.handlers (--peering=NAME | --standalone) (--all-namespaces | --namespace=NS)
     [--liveness=http://0.0.0.0:8080/healthz]
With --peering, replicas elect the one that works (peering.py); --standalone: exactly one may run.
"""

import asyncio
import logging
import os
from typing import cast

import kopf

from nanoserve.operator import kube, peering
from nanoserve.operator.names import GROUP, PLURAL, VERSION
from nanoserve.operator.reconcile import reconcile

# How often every InferenceService is re-applied (drift repair) and its status refreshed.
RESYNC_SECONDS = float(os.environ.get("NANOSERVE_RESYNC_SECONDS", "30"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    kube.load_config()
    # kopf's state goes to our own annotations, so the status schema stays strict (no status.kopf).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Events for problems only
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300  # re-list now and then: a watch can stall silently
    peering.configure(settings)  # this replica's priority: the oldest replica works


def _new_status(body: kopf.Body) -> dict:
    meta = body["metadata"]
    return reconcile(
        body,
        meta["name"],
        meta["namespace"],
        dict(body["spec"]),
        meta.get("generation", 0),
        dict(body.get("status", {})),
    )


def _reconcile(body: kopf.Body, patch: kopf.Patch) -> None:
    patch.status.update(_new_status(body))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, patch: kopf.Patch, **_) -> None:
    _reconcile(body, patch)


# The resync is one operator-wide loop, not a kopf timer per object: a timer makes kopf put a finalizer on
# every InferenceService, and then nothing can be deleted while the operator is down. Without one, deleting
# an InferenceService never waits for the operator; its children go by their owner references.
@kopf.index(GROUP, VERSION, PLURAL)
def served(namespace: str | None, name: str, **_) -> dict:
    """The InferenceServices this operator serves (what it watches), by (namespace, name)."""
    return {(namespace, name): None}


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, served: kopf.Index, settings: kopf.OperatorSettings, **_) -> None:
    memo["resync"] = asyncio.create_task(_resync_loop(served, settings))


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_) -> None:
    memo["resync"].cancel()


async def _resync_loop(served: kopf.Index, settings: kopf.OperatorSettings) -> None:
    """Every RESYNC_SECONDS, each InferenceService again: restores children deleted or edited by hand and
    follows their rollout into the status. A failure of one is logged and retried at the next round.
    kopf's peering pauses its handlers, not this loop: a round runs only while this replica is the active
    one (a paused replica's index may still hold what it saw while it was)."""
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        keys = list(served)
        if not keys:
            continue
        try:
            if not await asyncio.to_thread(peering.active, settings, {ns for ns, _ in keys if ns}):
                continue
        except Exception:  # noqa: BLE001 - unsure whether it is this replica's turn: not this round
            log.exception("reading the peering object failed")
            continue
        for namespace, name in keys:
            try:
                await asyncio.to_thread(resync, namespace, name)
            except Exception:  # noqa: BLE001 - an API outage must not end the loop
                log.exception("resync of %s/%s failed", namespace, name)


def resync(namespace: str, name: str) -> None:
    api_version = f"{GROUP}/{VERSION}"
    body = kube.get(api_version, "InferenceService", namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    status = _new_status(kopf.Body(cast(kopf.RawBody, body)))
    kube.patch_status(api_version, "InferenceService", namespace, name, status)
