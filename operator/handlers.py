"""kopf handlers: thin glue between InferenceService events and reconcile().

Run: kopf run -m nanoserve.operator.handlers --standalone (--all-namespaces | --namespace=NS)
     [--liveness=http://0.0.0.0:8080/healthz]
"""

import logging
import os

import kopf

from nanoserve.operator import kube
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
    # A resync running when the object is deleted can't be cancelled (it is sync); kopf holds the finalizer
    # until it ends and re-checks only every cancellation_polling seconds (60 by default) unless a watch event
    # wakes it, and the resync's last status patch is usually a no-op, which makes none: deletions took ~60 s.
    settings.background.cancellation_polling = 1


def _reconcile(body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body["metadata"]
    new = reconcile(
        body,
        meta["name"],
        meta["namespace"],
        dict(body["spec"]),
        meta.get("generation", 0),
        dict(body.get("status", {})),
    )
    patch.status.update(new)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, patch: kopf.Patch, **_) -> None:
    _reconcile(body, patch)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, patch: kopf.Patch, **_) -> None:
    """Restores children deleted or edited by hand and follows their rollout into the status."""
    _reconcile(body, patch)
