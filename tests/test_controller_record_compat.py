"""The controller's durable record across releases: a new controller (a rolling update) reads the record an older
release wrote; one of a newer release (after a rollback), or one that does not fit the model it serves (a checkpoint
directory replaced in place, a hand edit), starts the placement over with a warning naming what is wrong, never a
controller that raises or tables that do. Real controllers (no Ray: the record's bytes in GcsRecord's memory) over a
tiny checkpoint."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from elasticmoe.autoscaler.record import FORMAT, GcsRecord
from tests.controller_util import ControllerImpl, _args
from tests.controller_util import model  # noqa: F401 - a fixture

KEY = "controller/default"


def _store(doc) -> None:
    GcsRecord("default")._memory[KEY] = doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def _written(model: str) -> dict:  # noqa: F811
    """The record of a controller of 2 shard positions, a and b registered and ready, c a spare, 2 versions on."""
    GcsRecord("default").clear()

    async def run():
        ctrl = ControllerImpl(_args(model))
        for sid, port in (("a", 1), ("b", 2), ("c", 3)):
            ctrl.registry.register(sid, f"127.0.0.1:{port}")
        ctrl.registry.mark_ready("a")
        ctrl.registry.mark_ready("b")
        ctrl._publish()
        ctrl._publish()
        return json.loads(GcsRecord("default")._memory[KEY])

    return asyncio.run(run())


def _restarted(model: str):  # noqa: F811
    async def run():
        ctrl = ControllerImpl(_args(model))
        table = ctrl._table()  # every gateway's poll reads it: it must not raise
        for task in list(ctrl._tasks):
            task.cancel()
        return ctrl, table

    return asyncio.run(run())


def test_the_record_names_its_format(model):  # noqa: F811
    assert _written(model)["format"] == FORMAT == 1


def test_a_record_of_an_older_release_is_resumed(model):  # noqa: F811
    """The record as releases before `format`, `healthy`, `unstaffed`, `scale` and `override` wrote it."""
    doc = _written(model)
    for field in ("format", "override", "scale"):
        del doc[field]
    del doc["registry"]["unstaffed"]
    for s in doc["registry"]["shards"]:
        del s["healthy"]
    _store(doc)
    ctrl, table = _restarted(model)
    assert ctrl.recovering and ctrl.registry.version == doc["registry"]["version"] + 1
    assert {s.shard_id: (s.position, s.ready, s.healthy) for s in ctrl.registry.shards.values()} == \
        {"a": (0, True, True), "b": (1, True, True), "c": (2, False, True)}
    assert [s["id"] for s in table["shards"]] == ["a", "b"]
    assert json.loads(GcsRecord("default")._memory[KEY])["format"] == FORMAT  # written again as this release does


def test_a_record_of_a_newer_release_starts_over_naming_both_formats(model, caplog):  # noqa: F811
    """A rollback: the record's fields may mean what this release does not know. Before, read as this release's."""
    doc = _written(model)
    doc["format"] = FORMAT + 1
    _store(doc)
    ctrl, table = _restarted(model)
    assert not ctrl.recovering and not ctrl.registry.shards and table["shards"] == []
    assert ctrl.registry.version > doc["registry"]["version"]  # numbered above it: no version repeats another table
    assert f"format {FORMAT + 1}" in caplog.text and f"reads format {FORMAT}" in caplog.text
    assert json.loads(GcsRecord("default")._memory[KEY])["format"] == FORMAT


def _layout(doc) -> list:
    return doc["registry"]["placement"]["layout"]


CORRUPT = {
    "more layers than the model": lambda d: _layout(d).append(copy.deepcopy(_layout(d)[0])),
    "fewer layers than the model": lambda d: _layout(d).pop(),
    "fewer experts than the model": lambda d: [row.pop() for row in _layout(d)],
    "a position held twice": lambda d: d["registry"]["shards"][1].update(position=0),
    "a negative position": lambda d: d["registry"]["shards"][0].update(position=-1),
    "a shard id not a string": lambda d: d["registry"]["shards"][0].update(id=7),
    "an address not a string": lambda d: d["registry"]["shards"][0].update(address=None),
    "shards not a list": lambda d: d["registry"].update(shards={"a": 0}),
    "a registry not an object": lambda d: d.update(registry=[1]),
    "a format not a number": lambda d: d.update(format="2"),
}


@pytest.mark.parametrize("what", CORRUPT)
def test_a_record_that_does_not_fit_starts_over(model, what, caplog):  # noqa: F811
    """Before: more layers than the model resumed, then every table() raised IndexError (no gateway got a table
    again); fewer layers or experts resumed tables without them (requests failed at those layers for good); a
    position held twice or negative, or an id of another type, resumed as such."""
    doc = _written(model)
    CORRUPT[what](doc)
    _store(doc)
    ctrl, table = _restarted(model)
    assert not ctrl.recovering and not ctrl.registry.shards and table["shards"] == []
    assert len(table["layers"]) == len(ctrl.moe_layers)
    assert all(len(experts) == ctrl.num_experts for experts in table["layers"].values())
    assert "controller record" in caplog.text and "starting over" in caplog.text


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"\xff\xfe", b"null"])
def test_a_record_that_is_not_one_starts_over(model, raw, caplog):  # noqa: F811
    _store(raw)
    ctrl, table = _restarted(model)
    assert not ctrl.recovering and table["shards"] == [] and "unreadable controller record" in caplog.text
