"""Two operator replicas as the chart runs them (kopf peering): one works, the other waits and takes over.

The chart is rendered by the real helm (watching one namespace, so kopf peers through a KopfPeering there);
its kopf peering CRDs and peering object are applied to the emulated API server, and two real `kopf run`
processes start from the rendered Deployment's command, args and env (as two pods would, each with its own
POD_ID). Each authenticates with a token of its own, so the emulator's request log says who did what.
Waits are on events (keep-alives and resync rounds counted in that log), never on time.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys
import urllib.request

import kopf
import pytest
from op_harness import Kubectl
from poll import until
from procs import reserve_port

HELM_TESTS = pathlib.Path(__file__).parents[1] / "helm"
if str(HELM_TESTS) not in sys.path:
    sys.path.insert(0, str(HELM_TESTS))

from chart_install import operator_command, operator_kubeconfig  # noqa: E402
from helm_tool import Helm, helm_binary  # noqa: E402

from nanoserve.operator import peering  # noqa: E402

NS = "peering"
LIFETIME = 4  # seconds: the chart's peering.lifetimeSeconds, short so that a killed replica lapses soon
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def isvc(name: str, replicas: int = 1) -> dict:
    return {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"device": "cpu", "replicas": replicas},
    }


NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def entry(priority: int, seconds_ago: float = 0, lifetime: int = 30) -> dict:
    seen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_the_older_replica_has_the_higher_priority_exact_in_json():
    first, later = peering.start_priority(1_764_000_000_000, 999), peering.start_priority(1_764_000_000_001, 0)
    assert first > later and abs(first) < 2**53  # (a float holds it exactly: any JSON client reads it right)
    assert peering.start_priority(5, 1) != peering.start_priority(5, 2)  # same millisecond: the tie-break


def test_blockers_follow_kopfs_rule():
    status = {
        "older": entry(-1),
        "younger": entry(-9),
        "lapsed": entry(100, seconds_ago=31),  # higher, but dead: lastseen + lifetime has passed
        "me": entry(-5),
    }
    assert peering.blockers(status, -5, "me", NOW) == ["older"]
    assert peering.blockers(status, -1, "older", NOW) == []
    assert peering.blockers({"twin": entry(-5)}, -5, "me", NOW) == ["twin"]  # kopf pauses both of a tie
    assert peering.blockers({"me?": entry(-5)}, -5, None, NOW) == []  # identity unknown: that is itself
    assert peering.blockers({"old": {"priority": 3}}, 0, "me", NOW) == ["old"]  # no lastseen: live (kopf's)


def test_configure_takes_a_priority_unless_given_and_the_lifetime_from_the_env(monkeypatch):
    monkeypatch.setenv("NANOSERVE_PEERING_LIFETIME_SECONDS", "7")
    settings = kopf.OperatorSettings()
    peering.configure(settings)
    assert settings.peering.priority < 0 and settings.peering.lifetime == 7
    given = kopf.OperatorSettings()
    given.peering.priority = 666  # kopf run --dev
    peering.configure(given)
    assert given.peering.priority == 666


class Replica:
    """One operator pod: the chart's container command, run as a process with its pod name and token."""

    def __init__(self, deployment: dict, pod: str, cluster, tmp: pathlib.Path):
        self.deployment, self.pod, self.cluster, self.tmp = deployment, pod, cluster, tmp
        self.token = f"operator-{pod}"
        self.log_path = tmp / f"{pod}.log"

    def start(self) -> Replica:
        self.port = reserve_port()
        cmd, env = operator_command(self.deployment, self.port, pod=self.pod)
        kubeconfig = operator_kubeconfig(
            pathlib.Path(self.cluster.env["KUBECONFIG"]), self.token, self.tmp / f"{self.pod}.kubeconfig"
        )
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.tmp,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "HOME": str(self.tmp), "PYTHONSAFEPATH": "1", "KUBECONFIG": kubeconfig},
        )
        until(self._healthy, f"{self.pod}'s liveness endpoint", 60)
        return self

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, f"{self.pod} exited:\n{self.log_path.read_text()}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status == 200
        except OSError:
            return False

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of each request it made, from the emulator's index `since` on."""
        auth = f"Bearer {self.token}"
        served = list(self.cluster.emulator.served)[since:]
        return [(r.method.value, r.url.path) for r in served if r.headers.get("Authorization") == auth]

    def work(self, since: int = 0) -> list[tuple[str, str]]:
        """What a paused replica must not do: write anything but its keep-alive, or read InferenceServices
        (discovery, and watching CRDs and namespaces, go on)."""
        return [
            (m, p)
            for m, p in self.requests(since)
            if (m in WRITES and "/kopf.dev/" not in p) or "/inferenceservices" in p
        ]

    def keepalives(self, since: int = 0) -> int:
        return sum(1 for m, p in self.requests(since) if m == "PATCH" and "/kopfpeerings/" in p)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def chart(tmp_path) -> list[dict]:
    values = {"watchNamespaces": [NS], "resyncSeconds": 1, "peering": {"lifetimeSeconds": LIFETIME}}
    return Helm(helm_binary(), tmp_path / "helm").template(values)


def kopf_cli(cluster, *args: str) -> None:
    """`kopf freeze`/`kopf resume`, the way to pause every replica by hand."""
    kopf = pathlib.Path(sys.executable).parent / "kopf"
    proc = subprocess.run([str(kopf), *args], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def mark(cluster) -> int:
    return len(cluster.emulator.served)


def peers(kubectl: Kubectl, name: str) -> dict:
    return (kubectl.get("kopfpeering", name, NS) or {}).get("status") or {}


def children(kubectl: Kubectl, name: str) -> dict[tuple[str, str], str]:
    kinds = "deployments,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets,"
    kinds += "horizontalpodautoscalers.v2.autoscaling"
    items = kubectl.items(kinds, f"app.kubernetes.io/instance={name}", NS)
    return {(o["kind"], o["metadata"]["name"]): o["metadata"]["uid"] for o in items}


def reconciled(kubectl: Kubectl, name: str) -> dict | None:
    obj = kubectl.get("isvc", name, NS)
    st = (obj or {}).get("status", {})
    return obj if st.get("observedGeneration") == obj["metadata"]["generation"] else None


def engine_replicas(kubectl: Kubectl, name: str) -> int | None:
    return ((kubectl.get("deployment", f"{name}-engine", NS) or {}).get("spec") or {}).get("replicas")


def resyncs(replica: Replica, since: int) -> int:
    """Its status writes (each resync round, each handler run, writes one)."""
    return sum(1 for m, p in replica.work(since) if m == "PATCH" and p.endswith("/status"))


def paused_while_the_other_works(waiting: Replica, working: Replica, cluster, since: int) -> None:
    """Through two of the waiting replica's keep-alives (so peering events), and a resync round of the
    working one after them, the waiting one touches nothing but the peering object: no reconcile, not even
    a list or watch of InferenceServices."""
    until(lambda: waiting.keepalives(since) >= 2, f"keep-alives of {waiting.pod}", 30)
    after = mark(cluster)
    until(lambda: resyncs(working, after) >= 1, f"a resync by {working.pod}", 30)
    assert waiting.work(since) == [], f"{waiting.pod} worked while paused:\n{waiting.log_path.read_text()}"


def test_two_replicas_one_works_the_other_takes_over_and_deletes_need_no_operator(cluster, kubectl, chart, tmp_path):
    (dep,) = [o for o in chart if o["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2
    (peering,) = [o for o in chart if o["kind"] == "KopfPeering"]
    assert peering["metadata"]["namespace"] == NS
    name = peering["metadata"]["name"]
    for crd in [o for o in chart if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "kopf.dev"]:
        kubectl.apply(crd)
        kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}")
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    kubectl.apply(peering, NS)

    replicas: list[Replica] = []

    def replica(pod: str) -> Replica:
        replicas.append(r := Replica(dep, pod, cluster, tmp_path).start())
        return r

    try:
        # The first replica works alone; a second one, started later (younger: a lower priority), waits.
        a = replica("nanoserve-a")
        kubectl.apply(isvc("duo"), NS)
        until(lambda: reconciled(kubectl, "duo"), "duo reconciled by the first replica")
        kids = until(lambda: (k := children(kubectl, "duo")) and len(k) == 9 and k, "duo's children")
        since = mark(cluster)
        b = replica("nanoserve-b")
        until(lambda: {a.pod, b.pod} <= set(peers(kubectl, name)), "both replicas in the peering object")
        assert peers(kubectl, name)[a.pod]["priority"] > peers(kubectl, name)[b.pod]["priority"]
        paused_while_the_other_works(b, a, cluster, since)
        assert children(kubectl, "duo") == kids  # nothing recreated, nothing added

        # `kopf freeze` (priority 100, above every replica's) pauses the working one too: its kopf handlers,
        # and the resync loop, which kopf does not pause (the index it goes over still holds duo).
        kopf_cli(cluster, "freeze", f"--peering={name}", f"--namespace={NS}", "--lifetime=60", "--id=freezer")
        until(lambda: "Pausing operations in favour of" in a.log_path.read_text(), "the working replica paused")
        paused = mark(cluster)
        until(lambda: a.keepalives(paused) >= 1, "a keep-alive after the pause")  # a round in flight is done
        frozen = mark(cluster)
        until(lambda: a.keepalives(frozen) >= 2 and b.keepalives(frozen) >= 2, "keep-alives while frozen", 30)
        assert a.work(frozen) == [] and b.work(frozen) == []
        resumed = mark(cluster)
        kopf_cli(cluster, "resume", f"--peering={name}", f"--namespace={NS}", "--id=freezer")
        until(lambda: resyncs(a, resumed) >= 1, "the working replica back at work")
        assert b.work(frozen) == []

        # The working one is killed: no goodbye, its entry lapses after its lifetime; the other takes over.
        a.kill()
        killed = mark(cluster)
        kubectl("patch", "isvc", "duo", "-n", NS, "--type=merge", "-p", json.dumps({"spec": {"replicas": 2}}))
        until(lambda: engine_replicas(kubectl, "duo") == 2, "the spec change applied by the second replica", 60)
        until(lambda: reconciled(kubectl, "duo"), "duo's status for the new generation")
        assert ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/duo-engine") in b.work(killed)
        assert "Resuming operations after the pause" in b.log_path.read_text()
        until(lambda: set(peers(kubectl, name)) == {b.pod}, "the dead replica's entry cleaned up")
        assert children(kubectl, "duo") == kids

        # A replica that exits says so: its entry goes at once. Then, with no operator at all, a delete
        # finishes (no finalizer holds it) and a new InferenceService waits.
        b.stop()
        until(lambda: peers(kubectl, name) == {}, "the stopped replica's goodbye")
        assert not kubectl.get("isvc", "duo", NS)["metadata"].get("finalizers")
        kubectl("delete", "isvc", "duo", "-n", NS, "--timeout=30s")  # waits until it is gone
        assert kubectl.get("isvc", "duo", NS) is None
        kubectl.apply(isvc("late"), NS)

        # Restarted (the older/younger order is checked above): nothing is duplicated, and the deleted one's
        # children (the garbage collector's, by owner reference) are left alone.
        since = mark(cluster)
        a2 = replica("nanoserve-c")
        until(lambda: reconciled(kubectl, "late"), "late reconciled after the restart")
        late = until(lambda: (k := children(kubectl, "late")) and len(k) == 9 and k, "late's children")
        after = mark(cluster)
        until(lambda: resyncs(a2, after) >= 1, "a resync round after late's children")
        assert children(kubectl, "late") == late and children(kubectl, "duo") == kids
        assert not [(m, p) for m, p in a2.work(since) if m in WRITES and "/duo" in p]
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.kill()
        kubectl("delete", "-n", NS, "isvc", "--all", "--wait=false")
