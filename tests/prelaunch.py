"""Processes that tests need, started ahead of the tests that need them (tests/conftest.py drives this).

Starting a server costs seconds of one core (a torch import, a model load, a tokenizer), and most of the
suite runs on one core of the two. A fixture that starts one registers a *plan* here: a launcher that starts
the process without waiting for it, and which tests need it. Before each test, the plans whose first test
is still to come are launched in the order of their first tests, at most `AHEAD` processes waiting at once
(each costs memory while it waits), so that a start overlaps the tests before it instead of adding to the
wall time. The fixture then `take`s the process (launching it there and then if it was not) and waits for it
to be ready, as it did before; it owns it from then on (stopping it, killing it). A launched process whose
tests are all past without taking it (skipped) is stopped, and so is any left at the end of the session.

Launchers run from an unrelated test's setup: they may only ask for the session fixtures of tests/conftest.py
(tiny_models, bpe_model, default_model_path, tmp_path_factory). Nothing waits or asserts in a launcher.
NANOSERVE_TEST_PRELAUNCH=0 turns prelaunching off: each process then starts when its fixture asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

AHEAD = 6  # processes launched ahead and not yet taken, at most (a tiny-model server holds ~0.7 GB)
ENABLED = os.environ.get("NANOSERVE_TEST_PRELAUNCH", "1") != "0"


@dataclass
class Plan:
    name: str
    launch: Callable[[Callable[[str], Any]], Any]  # launch(getfixturevalue) -> the process (not yet ready)
    needs: Callable[[Any], bool]  # needs(item): does this test use it?
    stop: Callable[[Any], None]
    weight: int  # processes it starts, for the AHEAD budget
    first: int | None = None  # index of the first and last tests that use it
    last: int | None = None
    launched: bool = False  # (ahead of its tests; once at most)
    waiting: Any = None  # launched ahead, not taken yet


_plans: dict[str, Plan] = {}
_index: dict[str, int] = {}  # test nodeid -> its position in the run


def uses(*fixtures: str) -> Callable[[Any], bool]:
    """A `needs` for tests that use any of these fixtures (directly or through other fixtures)."""
    return lambda item: any(f in getattr(item, "fixturenames", ()) for f in fixtures)


def param(name: str, value, in_file: str | None = None) -> Callable[[Any], bool]:
    """A `needs` for the tests whose parameter (or parametrized fixture) `name` has this value; only those in
    `in_file` (a test module's __file__) if given."""

    def needs(item) -> bool:
        callspec = getattr(item, "callspec", None)
        if in_file is not None and str(getattr(item, "path", "")) != in_file:
            return False
        return callspec is not None and name in callspec.params and callspec.params[name] == value

    return needs


def plan(name: str, needs: Callable[[Any], bool], stop: Callable[[Any], None] = lambda p: p.stop(), weight: int = 1):
    """Decorator: register `launch(getfixturevalue)` as the way to start the process called `name`."""

    def register(launch):
        _plans[name] = Plan(name, launch, needs, stop, weight)
        return launch

    return register


def server_fixture(name: str, launch: Callable[[Callable[[str], Any]], Any], scope: str = "function"):
    """A fixture called `name` for the tests that use it: the server `launch(getfixturevalue)` starts (a
    procs.ServerProcess), launched ahead of them, ready; stopped after them (its exit reaped at the end of the
    session: a test that checks how it exits waits for that itself). Assign it to a module variable."""
    plan(name, uses(name))(launch)

    @pytest.fixture(name=name, scope=scope)
    def server(request):
        proc = take(name, request.getfixturevalue)
        yield proc.wait_ready()
        proc.stop_later()

    return server


def take(name: str, getfixturevalue: Callable[[str], Any]) -> Any:
    """The process of plan `name`, launched ahead or now; the caller owns it (waits for it, stops it)."""
    p = _plans[name]
    p.launched = True  # not ahead of its tests any more
    proc, p.waiting = p.waiting, None
    return proc if proc is not None else p.launch(getfixturevalue)


def schedule(items: list) -> None:
    """After collection: which tests need which plan (the first and last of them)."""
    _index.clear()
    for i, item in enumerate(items):
        _index[item.nodeid] = i
        for p in _plans.values():
            if p.needs(item):
                p.first = i if p.first is None else p.first
                p.last = i


def ahead(item, getfixturevalue: Callable[[str], Any]) -> None:
    """Before `item` (a test, or the session: its first test) sets up: stop what earlier tests left untaken,
    launch what comes next within the budget."""
    i = _index.get(item.nodeid, 0)
    if not ENABLED:
        return
    for p in _plans.values():
        if p.waiting is not None and p.last is not None and p.last < i:  # its tests were skipped
            _stop(p)
    budget = AHEAD - sum(p.weight for p in _plans.values() if p.waiting is not None)
    coming = sorted(
        (p for p in _plans.values() if p.first is not None and p.first >= i and not p.launched), key=lambda p: p.first
    )
    for p in coming:
        if p.weight > budget:
            break
        p.launched = True
        budget -= p.weight
        try:
            p.waiting = p.launch(getfixturevalue)
        except Exception:  # nothing lost: its fixture launches it again, and fails in its own test
            p.waiting = None


def _stop(p: Plan) -> None:
    proc, p.waiting = p.waiting, None
    if proc is not None:
        p.stop(proc)


def stop_all() -> None:
    for p in _plans.values():
        _stop(p)
