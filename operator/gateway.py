"""Pure rendering of the gateway: its Deployment, client-facing Service and EndpointSlice RBAC."""

from nanoserve.gateway.config import gateway_argv
from nanoserve.operator.autoscaling import uses_keda
from nanoserve.operator.names import GATEWAY_PORT, GROUP, engine_name, gateway_name, labels, selector, service_name
from nanoserve.operator.pod_overrides import apply_pod_overrides
from nanoserve.operator.security import container_security, pod_security

# A rolling update drops no request: the preStop pause lets the Service stop sending new connections
# here before SIGTERM, then the gateway stops listening and lets open requests (streams) run this long.
GATEWAY_DRAIN_SECONDS = 5
GATEWAY_GRACE_SECONDS = 60


def render_gateway_rbac(name: str, spec: dict) -> list[dict]:
    """The gateway watches its engines' EndpointSlices, in its own namespace only; with scaleToZero it reads
    and sets its InferenceService's scale (and no other's)."""
    sa = gateway_name(name)
    meta = {"name": sa, "labels": labels(name, "gateway")}
    rules = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
    if (spec.get("scaleToZero") or {}).get("enabled"):
        rules.append(
            {
                "apiGroups": [GROUP],
                "resources": ["inferenceservices/scale"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        )
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": True},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa}],
        },
    ]


def scale_args(name: str, spec: dict, keda: bool) -> dict:
    """The gateway's scale-from-zero flags (gateway/activator.py); idle scale-down is KEDA's where it scales."""
    zero = spec.get("scaleToZero") or {}
    if not zero.get("enabled"):
        return {}
    args = {
        "scale_target": name,
        "activation_timeout": zero.get("activationTimeoutSeconds", 300),
        "max_held_requests": zero.get("maxHeldRequests", 256),
    }
    if not uses_keda(spec, keda) and zero.get("idleSeconds", 600) > 0:
        args["scale_to_zero_after"] = zero.get("idleSeconds", 600)
    return args


def render_gateway_deployment(name: str, namespace: str, spec: dict, keda: bool = False) -> dict:
    gw = spec["gateway"]
    workers = gw["workers"]  # (the CRD defaults it)
    env: list[dict] = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/huggingface"}]
    if spec.get("apiKeySecret"):  # the gateway's own calls to the engines (health, metrics) need the key
        env.append(
            {
                "name": "NANOSERVE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": spec["apiKeySecret"], "key": "api-key"}},
            }
        )
    http = lambda path: {"httpGet": {"path": path, "port": "http"}}  # noqa: E731
    container = {
        "name": "gateway",
        "image": gw["image"],
        "command": ["nanoserve", "gateway"],
        "args": gateway_argv(
            {
                "port": GATEWAY_PORT,
                "service": engine_name(name),
                "namespace": namespace,
                "policy": gw["policy"],
                "drain_timeout": GATEWAY_GRACE_SECONDS,
                **({"workers": workers} if workers > 1 else {}),
                **scale_args(name, spec, keda),
            }
        ),
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "env": env,
        # Each worker a core's half and its own tokenizers, feeds and indexes.
        "resources": {
            "requests": {"cpu": f"{500 * workers}m", "memory": f"{512 * workers}Mi"},
            "limits": {"memory": f"{workers}Gi"},
        },
        "readinessProbe": {**http("/ready"), "periodSeconds": 5},
        "livenessProbe": {**http("/health"), "periodSeconds": 10, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": GATEWAY_DRAIN_SECONDS}}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    template = {
        "metadata": {"labels": labels(name, "gateway")},
        "spec": {
            "serviceAccountName": gateway_name(name),
            "terminationGracePeriodSeconds": GATEWAY_DRAIN_SECONDS + GATEWAY_GRACE_SECONDS + 5,
            "securityContext": pod_security(),
            "enableServiceLinks": False,
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    apply_pod_overrides(template, container, gw.get("pod"))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": gateway_name(name), "labels": labels(name, "gateway")},
        "spec": {
            "replicas": gw["replicas"],
            "selector": {"matchLabels": selector(name, "gateway")},
            "template": template,
        },
    }


def render_gateway_service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "labels": labels(name, "gateway")},
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name, "gateway"),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
