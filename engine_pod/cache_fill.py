"""Fill a model folder once, even when several pods start at once on one shared volume (the model cache PVC).

The first pod takes an exclusive lock (flock on a file beside the folder), downloads into a temporary
folder, writes a completion marker into it and renames it into place (atomic on one file system). Another
pod waits for the lock, then finds the marker and reuses the folder. A pod that died mid-download left
no marker and released its lock (the kernel drops it with the process; NFS v4 and CephFS, which back most
ReadWriteMany volumes, honour flock across nodes): the next one throws the half-download away and starts
again.
"""

import fcntl
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

MARKER = ".nanoserve-model.json"  # inside a complete folder only


def complete(folder: Path) -> dict | None:
    """The marker of a complete folder (what filled it), else None."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def fill_once(folder: Path, source: str, fill: Callable[[Path], None]) -> dict:
    """Makes `folder` hold the model `fill` downloads (into the folder it is given), unless a complete copy is
    already there. Returns the marker, with `downloaded` True only for the call that downloaded it."""
    if (done := complete(folder)) is not None:  # the common case: no lock needed to read a finished folder
        return {**done, "downloaded": False}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another pod downloads this model
        if (done := complete(folder)) is not None:
            return {**done, "downloaded": False}
        partial = folder.parent / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a download that died half-way: start again
        shutil.rmtree(folder, ignore_errors=True)  # no marker: not ours to trust
        partial.mkdir()
        start = time.monotonic()
        fill(partial)
        marker = {
            "source": source,
            "bytes": sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()),
            "downloadSeconds": round(time.monotonic() - start, 3),
        }
        (partial / MARKER).write_text(json.dumps(marker))
        partial.rename(folder)
        return {**marker, "downloaded": True}
