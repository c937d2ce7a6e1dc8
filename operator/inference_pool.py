"""spec.router inferencePool -> an InferencePool (Gateway API Inference Extension, inference.networking.k8s.io/v1)
of the engine pods, whose endpoint picker is the InferenceService's own gateway.

The gateway pods run `nanoserve epp`: the same gateway, plus Envoy's ext-proc gRPC port (gateway/epp.py).
So the pool's picker and the gateway's HTTP Service are one process with one routing state (cache feeds,
tokenizers, load), and status.url keeps working for clients inside the cluster, beside the Gateway API
route. The picker finds the engines as the gateway does, by the engine Service's EndpointSlices (the pods the
pool selects): its RBAC stays the gateway's.
"""

import copy

from nanoserve.gateway.epp import EppConfig, epp_argv
from nanoserve.operator.names import ENGINE_PORT, labels, selector

API_VERSION = "inference.networking.k8s.io/v1"
EPP_PORT: int = EppConfig.grpc_port  # the default of `nanoserve epp --grpc-port`


def epp_service_name(isvc: str) -> str:
    return f"{isvc}-epp"


def as_endpoint_picker(gateway: dict) -> dict:
    """The gateway Deployment, its container running `nanoserve epp` with the gRPC port open."""
    dep = copy.deepcopy(gateway)
    c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    c["command"] = ["nanoserve", "epp"]
    c["args"] = c["args"] + epp_argv({"grpc_port": EPP_PORT})
    c["ports"] = c["ports"] + [{"name": "grpc", "containerPort": EPP_PORT, "protocol": "TCP"}]
    return dep


def render_epp_service(name: str) -> dict:
    """The endpointPickerRef's Service: the gateway pods' ext-proc port (gRPC, so HTTP/2 in clear text)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": epp_service_name(name), "labels": labels(name, "gateway")},
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name, "gateway"),
            "ports": [
                {
                    "name": "grpc",
                    "port": EPP_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                }
            ],
        },
    }


def render_inference_pool(name: str) -> dict:
    """Named after the InferenceService: an HTTPRoute's backendRef names it. FailClose: without its picker a
    Gateway answers 503 rather than spreading requests blind of the engines' caches and health."""
    return {
        "apiVersion": API_VERSION,
        "kind": "InferencePool",
        "metadata": {"name": name, "labels": labels(name, "engine")},
        "spec": {
            "selector": {"matchLabels": selector(name, "engine")},
            "targetPorts": [{"number": ENGINE_PORT}],
            "appProtocol": "http",
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": epp_service_name(name),
                "port": {"number": EPP_PORT},
                "failureMode": "FailClose",
            },
        },
    }
