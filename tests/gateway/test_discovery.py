"""Endpoint discovery: static lists and EndpointSlice parsing (no cluster needed)."""

from __future__ import annotations

from kubernetes.client import DiscoveryV1EndpointPort, V1Endpoint, V1EndpointConditions, V1EndpointSlice, V1ObjectMeta

from nanoserve.gateway.discovery import merge_slices, parse_endpoint_slice, static_targets


def make_slice(endpoints, ports, address_type="IPv4", name="engines-abc"):
    return V1EndpointSlice(
        address_type=address_type,
        metadata=V1ObjectMeta(name=name),
        endpoints=[
            V1Endpoint(addresses=addrs, conditions=V1EndpointConditions(ready=ready)) for addrs, ready in endpoints
        ],
        ports=[DiscoveryV1EndpointPort(name=n, port=p, protocol="TCP") for n, p in ports],
    )


def test_static_targets_are_ready_and_normalised():
    assert static_targets(["http://a:8000/", "http://b:8000"]) == {"http://a:8000": True, "http://b:8000": True}


def test_readiness_of_each_endpoint():
    s = make_slice([(["10.0.0.1"], True), (["10.0.0.2"], False), (["10.0.0.3"], None)], [("http", 8000)])
    assert parse_endpoint_slice(s) == {
        "http://10.0.0.1:8000": True,
        "http://10.0.0.2:8000": False,  # known, not routed to
        "http://10.0.0.3:8000": True,
    }  # unknown counts as ready


def test_named_port_is_chosen():
    s = make_slice([(["10.0.0.1"], True)], [("metrics", 9090), ("http", 8000)])
    assert parse_endpoint_slice(s, port_name="http") == {"http://10.0.0.1:8000": True}
    assert parse_endpoint_slice(s) == {"http://10.0.0.1:9090": True}
    assert parse_endpoint_slice(s, port_name="grpc") == {}


def test_ipv6_addresses_are_bracketed():
    s = make_slice([(["fd00::1"], True)], [("http", 8000)], address_type="IPv6")
    assert parse_endpoint_slice(s, scheme="https") == {"https://[fd00::1]:8000": True}


def test_empty_slice():
    assert parse_endpoint_slice(V1EndpointSlice(address_type="IPv4", endpoints=[], ports=None)) == {}


def test_raw_api_dicts_parse_like_client_objects():
    obj = {
        "addressType": "IPv4",
        "metadata": {"name": "x"},
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": False}}, {"addresses": ["10.1.0.6"]}],
        "ports": [{"name": "http", "port": 8000}],
    }
    assert parse_endpoint_slice(obj, "http") == {"http://10.1.0.5:8000": False, "http://10.1.0.6:8000": True}


def test_slices_merge_and_any_ready_wins():
    a = {"http://10.0.0.1:8000": False, "http://10.0.0.2:8000": True}
    b = {"http://10.0.0.1:8000": True, "http://10.0.0.3:8000": False}
    assert merge_slices({"a": a, "b": b}) == {
        "http://10.0.0.1:8000": True,
        "http://10.0.0.2:8000": True,
        "http://10.0.0.3:8000": False,
    }


def test_watcher_applies_list_then_watch_events():
    from types import SimpleNamespace

    from nanoserve.gateway.discovery import EndpointSliceWatcher

    a = make_slice([(["10.0.0.1"], True)], [("http", 8000)], name="a")
    b = make_slice([(["10.0.0.2"], False)], [("http", 8000)], name="b")
    b_ready = make_slice([(["10.0.0.2"], True)], [("http", 8000)], name="b")
    calls = []

    class FakeApi:
        def list_namespaced_endpoint_slice(self, namespace, label_selector):
            calls.append((namespace, label_selector))
            return SimpleNamespace(items=[a], metadata=SimpleNamespace(resource_version="7"))

    class FakeWatch:
        def stream(self, fn, namespace, **kw):
            assert kw["resource_version"] == "7" and kw["label_selector"] == calls[0][1]
            yield {"type": "ADDED", "object": b}
            yield {"type": "BOOKMARK", "object": b}
            yield {"type": "MODIFIED", "object": b_ready}
            yield {"type": "DELETED", "object": a}

    delivered = []
    w = EndpointSliceWatcher("engines", "llm", on_targets=None, port_name="http")
    w.api, w.watch_factory = FakeApi(), FakeWatch
    w.watch_once(delivered.append)
    assert calls == [("llm", "kubernetes.io/service-name=engines")]
    assert delivered == [
        {"http://10.0.0.1:8000": True},
        {"http://10.0.0.1:8000": True, "http://10.0.0.2:8000": False},
        {"http://10.0.0.1:8000": True, "http://10.0.0.2:8000": True},
        {"http://10.0.0.2:8000": True},
    ]
