"""spec.networkPolicy -> a NetworkPolicy on the engine pods: only the gateway's pods (and the peers in
allowFrom, such as Prometheus) reach their port. Probes come from the kubelet on the node, which
NetworkPolicies leave alone."""

from nanoserve.operator.names import ENGINE_PORT, engine_name, labels, selector


def render_network_policy(name: str, spec: dict) -> dict:
    peers = [{"podSelector": {"matchLabels": selector(name, "gateway")}}] if spec["gateway"]["enabled"] else []
    peers += spec["networkPolicy"].get("allowFrom", [])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": engine_name(name), "labels": labels(name, "engine")},
        "spec": {
            "podSelector": {"matchLabels": selector(name, "engine")},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": ENGINE_PORT}]}] if peers else [],
        },
    }
