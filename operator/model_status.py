"""Pure: status.modelLoad from the engine pods' status, and the downloads that failed.

Only what was measured: the download step's own report (its termination message, kept by the kubelet in
the pod's status: source, whether it downloaded or found the model in the cache, bytes, its run time) and
the kubelet's timestamps from the engine container's start to the pod's Ready (loading the model, and for a
GPU compiling its CUDA graphs).
"""

import datetime
import json

from nanoserve.operator.model import model_summary

DOWNLOAD = "download-model"  # the init container's name (operator/model.py)
FIELDS = ("pod", "source", "downloaded", "bytes", "downloadSeconds", "readySeconds")


def _time(stamp: str | None) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(stamp or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def ready_seconds(pod: dict) -> int | None:
    """From the engine container's start to the pod's Ready (the kubelet's timestamps, to the second)."""
    st = pod.get("status", {})
    engine = next((c for c in st.get("containerStatuses", []) if c.get("name") == "engine"), {})
    started = _time(((engine.get("state") or {}).get("running") or {}).get("startedAt"))
    ready = next((c for c in st.get("conditions", []) if c.get("type") == "Ready" and c.get("status") == "True"), None)
    since = _time((ready or {}).get("lastTransitionTime"))
    if started is None or since is None or since < started:
        return None
    return int((since - started).total_seconds())


def _download(pod: dict) -> dict | None:
    """The download init container's last finished run: {exitCode, message, finishedAt}, or None."""
    init = next((c for c in pod.get("status", {}).get("initContainerStatuses", []) if c.get("name") == DOWNLOAD), {})
    return (init.get("state") or {}).get("terminated") or (init.get("lastState") or {}).get("terminated")


def model_load(model: dict, pods: list[dict]) -> tuple[dict | None, list[tuple[str, str]]]:
    """(status.modelLoad of the newest pod that got its model, or None; (reason, message) of failed downloads)."""
    problems, loads = [], []
    for pod in pods:
        name = pod["metadata"]["name"]
        run = _download(pod)
        if run is not None and run.get("exitCode") != 0:
            message = (run.get("message") or run.get("reason") or "").strip()[-500:]
            problems.append(("ModelDownloadFailed", f"{name}: {message}"))
            continue
        load: dict = {"pod": name, "source": model_summary(model)}
        if run is not None:
            try:
                report = json.loads(run.get("message") or "")
            except json.JSONDecodeError:
                report = {}
            load |= {k: report[k] for k in ("source", "downloaded", "bytes") if k in report}
            if "seconds" in report:
                load["downloadSeconds"] = report["seconds"]
        elif "builtin" not in model and "pvc" not in model:
            continue  # a download that has not finished yet: nothing measured
        if (seconds := ready_seconds(pod)) is not None:
            load["readySeconds"] = seconds
        loads.append((pod["metadata"].get("creationTimestamp", ""), name, load))
    newest = max(loads, key=lambda x: (x[0], x[1]))[2] if loads else None
    return newest, problems


def status_patch(load: dict | None) -> dict:
    """status.modelLoad for a merge patch: what is not measured now is null, so no older value stays behind."""
    return {"modelLoad": {f: load.get(f) for f in FIELDS} if load else None}
