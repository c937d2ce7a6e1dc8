"""Endpoint discovery: a static URL list, or the EndpointSlices of a Kubernetes Service.

The `kubernetes` client is synchronous, so the watch runs in a thread and hands complete target lists
({url: ready}) to the event loop. Parsing of EndpointSlice objects is pure and unit-tested.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Targets = dict[str, bool]  # engine base URL -> ready


def static_targets(urls: list[str]) -> Targets:
    return {url.rstrip("/"): True for url in urls}


def _get(obj: Any, snake: str, camel: str | None = None) -> Any:
    """Field of a kubernetes client model or of a raw (camelCase) dict."""
    if isinstance(obj, dict):
        return obj.get(camel or snake, obj.get(snake))
    return getattr(obj, snake, None)


def parse_endpoint_slice(obj: Any, port_name: str | None = None, scheme: str = "http") -> Targets:
    """URLs of one EndpointSlice's endpoints. Unknown readiness counts as ready (as the API advises);
    an endpoint that is not ready is listed so that it stays known but is not routed to."""
    ports = _get(obj, "ports") or []
    port = next((_get(p, "port") for p in ports if port_name is None or _get(p, "name") == port_name), None)
    if port is None:
        return {}
    ipv6 = _get(obj, "address_type", "addressType") == "IPv6"
    out: Targets = {}
    for ep in _get(obj, "endpoints") or []:
        conditions = _get(ep, "conditions")
        ready = _get(conditions, "ready") if conditions is not None else None
        for addr in _get(ep, "addresses") or []:
            host = f"[{addr}]" if ipv6 else addr
            out[f"{scheme}://{host}:{port}"] = ready is not False
    return out


def merge_slices(slices: dict[str, Targets]) -> Targets:
    """One Service's targets over all its slices; an address listed twice is ready if any slice says so."""
    out: Targets = {}
    for targets in slices.values():
        for url, ready in targets.items():
            out[url] = out.get(url, False) or ready
    return out


class EndpointSliceWatcher:
    """Lists then watches the EndpointSlices labelled kubernetes.io/service-name=<service>."""

    def __init__(
        self,
        service: str,
        namespace: str,
        on_targets: Callable[[Targets], None],
        port_name: str | None = None,
        scheme: str = "http",
    ) -> None:
        self.selector = f"kubernetes.io/service-name={service}"
        self.namespace = namespace
        self.on_targets = on_targets
        self.port_name = port_name
        self.scheme = scheme
        self.api: Any = None
        self.watch_factory: Callable[[], Any] = lambda: None  # kubernetes.watch.Watch once connected
        self._stop = threading.Event()

    def connect(self) -> None:
        """Load the in-cluster (or kubeconfig) credentials; raises at startup when there are none."""
        from kubernetes import client, config, watch  # lazy: only needed in a cluster

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api, self.watch_factory = client.DiscoveryV1Api(), watch.Watch

    async def run(self) -> None:
        """Watch in a daemon thread (the client blocks) until cancelled."""
        loop = asyncio.get_running_loop()

        def deliver(targets: Targets) -> None:
            if not self._stop.is_set():
                loop.call_soon_threadsafe(self.on_targets, targets)

        thread = threading.Thread(target=self.watch_forever, args=(deliver,), daemon=True, name="endpointslice-watch")
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()  # the thread ends at its next event or watch timeout

    def watch_forever(self, deliver: Callable[[Targets], None]) -> None:
        while not self._stop.is_set():
            try:
                self.watch_once(deliver)
            except Exception as e:  # noqa: BLE001 - API errors, 410 Gone: back off and re-list
                log.warning("EndpointSlice watch of %s: %r", self.selector, e)
                self._stop.wait(2.0)

    def watch_once(self, deliver: Callable[[Targets], None]) -> None:
        """One list, then one watch from its resourceVersion until it times out or errs."""
        listing = self.api.list_namespaced_endpoint_slice(self.namespace, label_selector=self.selector)
        slices = {s.metadata.name: self._parse(s) for s in listing.items}
        deliver(merge_slices(slices))
        stream = self.watch_factory().stream(
            self.api.list_namespaced_endpoint_slice,
            self.namespace,
            label_selector=self.selector,
            timeout_seconds=30,
            resource_version=listing.metadata.resource_version,
        )
        for event in stream:
            if self._stop.is_set():
                return
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                return  # e.g. 410 Gone: re-list
            if kind == "DELETED":
                slices.pop(obj.metadata.name, None)
            elif kind in ("ADDED", "MODIFIED"):
                slices[obj.metadata.name] = self._parse(obj)
            else:
                continue  # BOOKMARK
            deliver(merge_slices(slices))

    def _parse(self, obj: Any) -> Targets:
        return parse_endpoint_slice(obj, self.port_name, self.scheme)
