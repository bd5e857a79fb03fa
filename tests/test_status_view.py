"""`elasticmoe status` views (text, --json, --watch) of a real Controller.status(): the controller and two expert
shards run in this process over real gRPC, and the demo model's requests go through the gateway's dispatcher."""

from __future__ import annotations

import asyncio
import io
import json
import re

import numpy as np
import pytest
import torch

from elasticmoe import SamplingParams
from elasticmoe.autoscaler.controller import Controller
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.cli import main as cli_main
from elasticmoe.engine.engine import Engine
from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.model import open_model
from elasticmoe.model.embedded import ensure_tiny_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.status_view import bar, event_line, expert_tokens, health, render, to_json, watch
from tests.doc_util import REPO

PROMPTS = ["The quick brown fox", "Water boils at", "Music fills the hall"]


async def _statuses() -> tuple[dict, dict, dict, np.ndarray]:
    """(status before any request, status after three greedy requests, status once shard-b died and a health probe
    found it, the gateway's expert-token totals [layers, experts]) of a 2-shard demo-model cluster. The controller's
    loops are stopped before shard-b dies: its re-home would otherwise take it out of the registry while the last
    status is read."""
    path = str(ensure_tiny_model("demo"))
    files = open_model(path)
    GcsRecord("default").clear()
    servers = []
    ctrl = Controller.func_or_class({"model": path, "num_shards": 2, "dtype": "float32", "device": "cpu"})
    try:
        for sid in ("shard-a", "shard-b"):
            store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
            server, _, port = start_server(store, sid)
            servers.append(server)
            plan = await ctrl.register(sid, f"127.0.0.1:{port}")
            store.load(plan["experts"])
            await ctrl.ready(sid)
        before = await ctrl.status()
        dispatcher = GrpcDispatcher(timeout_s=10)
        dispatcher.set_table(RoutingTable.from_dict(await ctrl.table()))
        engine = Engine(files, dispatcher)
        spec = files.spec
        metrics = GatewayMetrics("per_expert", spec.num_layers, spec.moe.num_experts, spec.moe.moe_layers,
                                 use_ray=False)
        engine.model.route_observer = metrics.route  # as GatewayCore wires it
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), engine.tokenizer.encode(p), SamplingParams(max_tokens=12, temperature=0))
        while engine.has_work():
            engine.step()
        after = await ctrl.status()
        for task in ctrl._tasks:
            task.cancel()
        await asyncio.gather(*ctrl._tasks, return_exceptions=True)
        servers[1].stop(None)
        await ctrl._probe_once()  # marks shard-b failed: out of the table, still registered
        return before, after, await ctrl.status(), metrics.expert_token_totals()
    finally:
        for task in ctrl._tasks:
            task.cancel()
        for server in servers:
            server.stop(None)


@pytest.fixture(scope="module")
def cluster():
    return asyncio.run(_statuses())


@pytest.fixture(scope="module")
def statuses(cluster):
    return cluster[:2]


def test_the_header_counts_the_shards_the_table_routes_to(cluster):
    """"shards 2/2" read every registered shard as serving: with shard-b dead (its health probe failed, its experts
    not re-homed yet) the header still said 2/2, its row alone saying dead; it counts live shards now (1/2)."""
    _, st, dead, _ = cluster
    assert render(st).startswith(f"placement version {st['version']}  shards 2/2 (desired 2)")
    assert [health(s) for s in dead["shards"]] == ["ok", "dead"] and dead["num_shards"] == 2
    assert render(dead).startswith(f"placement version {dead['version']}  shards 1/2 (desired 2)"), render(dead)


def test_json_round_trips_the_status(statuses):
    _, st = statuses
    back = json.loads(to_json(st))
    assert back["version"] == st["version"] and back["complete"] is True
    assert [s["id"] for s in back["shards"]] == ["shard-a", "shard-b"]
    assert sum(s["tokens"] for s in back["shards"]) > 0


def test_the_shards_served_the_routings_the_gateway_counted(cluster):
    """Per (layer, expert), the tokens the shards' GetStats report (summed over them, as `status` shows them) equal
    the gateway's elasticmoe_expert_tokens_total: each routing served once, none lost or counted twice on the way;
    a shard's tokens column is the sum of its experts'."""
    _, st, _, totals = cluster
    assert expert_tokens(st) == {(l, e): int(n) for (l, e), n in np.ndenumerate(totals) if n} and totals.sum() > 0
    for s in st["shards"]:
        assert s["tokens"] == sum(n for _, _, n in s["expert_tokens"]) > 0


def test_text_view_lists_shards_health_load_and_hottest_experts(statuses):
    before, st = statuses
    text = render(st)
    assert f"placement version {st['version']}" in text and "balancedness" in text
    for s in st["shards"]:
        assert s["address"] in text and health(s) == "ok"
    served = expert_tokens(st)
    (layer, expert), n = max(served.items(), key=lambda kv: kv[1])
    assert f"hottest experts: L{layer}/E{expert}: {n}" in text
    assert "hottest experts: -" in render(before)  # nothing served yet
    assert "recent events:" in text and " ready shard=shard-a" in text


def test_watch_frames_show_the_interval_since_the_last_frame(statuses):
    before, st = statuses
    frames = iter([before, st])
    clock = iter([0.0, 2.0])
    out = io.StringIO()
    assert watch(lambda: next(frames), interval=0.0, out=out, iterations=2, clock=lambda: next(clock)) == 0
    first, second = out.getvalue().split("elasticmoe status  ")[1:]
    assert "tok/s" not in first and "tok/s" in second and "(last 2s)" in second
    rates = {s["id"]: s["tokens"] / 2.0 for s in st["shards"]}
    for sid, rate in rates.items():
        row = next(line for line in second.splitlines() if sid in line)
        assert f"{rate:7.0f}" in row and "█" in row or rate == 0


def test_bars_and_events_are_plain_functions():
    assert bar(0, 10, 8) == " " * 8 and bar(10, 10, 8) == "█" * 8 and bar(5, 10, 8) == "████    "
    assert len(bar(1, 3, 7)) == 7 and bar(100, 10, 4) == "████"
    assert health({"healthy": False, "ready": True}) == "dead" and health({"healthy": True}) == "loading"
    assert event_line({"t": 0, "event": "removed", "version": 3, "shard": "x", "why": "gone"}).endswith(
        "v3 removed shard=x why=gone")


def test_cli_has_json_and_watch_options():
    with pytest.raises(SystemExit) as e:
        cli_main(["status", "--json", "--watch", "--interval", "0.5", "--help"])
    assert e.value.code == 0


def test_watch_keeps_going_when_a_fetch_fails(statuses):
    before, st = statuses

    def frames():
        yield before
        raise TimeoutError("controller restarting")

    it = frames()
    seq = iter([lambda: next(it), lambda: next(it), lambda: st])
    out = io.StringIO()
    clock = iter([0.0, 4.0])
    watch(lambda: next(seq)(), interval=0.0, out=out, iterations=3, clock=lambda: next(clock))
    first, failed, third = out.getvalue().split("elasticmoe status  ")[1:]
    assert "status unavailable: TimeoutError: controller restarting" in failed
    assert "(last 4s)" in third  # measured from the last frame that had a status


def test_status_without_a_cluster_fails_with_a_message(monkeypatch, capsys):
    """`elasticmoe status` (and --watch) with no cluster to join: exit status 1 and the reason, not a traceback."""
    from elasticmoe import status_view

    def refuse(address, app="elasticmoe"):
        raise ConnectionError(f"could not find any running Ray instance at {address}")

    monkeypatch.setattr(status_view, "controller_status", refuse)
    for argv in (["status"], ["status", "--json"], ["status", "--watch"]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert "error:" in err and "could not find any running Ray instance" in err, err


@pytest.mark.parametrize("interval", ["0", "-1", "nan"])
def test_status_watch_rejects_a_bad_interval(interval, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["status", "--watch", "--interval", interval])
    assert e.value.code == 2 and "--interval" in capsys.readouterr().err


def test_generate_reaches_the_named_application(monkeypatch, capsys):
    """`elasticmoe generate --app NAME` (like `status --app`): Serve's gRPC proxy routes by the `application`
    metadata, so an application not named elasticmoe was unreachable from the command line."""
    from elasticmoe import client as client_mod

    seen = {}

    class Client:
        def __init__(self, address="127.0.0.1:9000", app="elasticmoe", timeout_s=300, api_key=None, tls=False):
            seen.update(address=address, app=app, timeout_s=timeout_s)

        def stream(self, prompt, **kw):
            return iter([type("R", (), {"text": "ok"})()])

        def close(self):
            seen["closed"] = True

    monkeypatch.setattr(client_mod, "GenerationClient", Client)
    assert cli_main(["generate", "hi", "--stream", "--app", "mine", "--timeout", "7"]) == 0
    assert seen == {"address": "127.0.0.1:9000", "app": "mine", "timeout_s": 7.0, "closed": True}
    assert capsys.readouterr().out == "ok\n"


def test_a_shard_whose_stats_call_failed_is_not_shown_ok():
    """A shard the health loop still counts healthy but whose GetStats failed for this status shows "unreach"
    (its 0 tokens are missing counts, not an idle shard); dead and loading keep their words."""
    from elasticmoe.status_view import health

    assert health({"healthy": True, "ready": True, "stats_error": "unreachable"}) == "unreach"
    assert health({"healthy": True, "ready": True}) == "ok"
    assert health({"healthy": True, "ready": False}) == "loading"
    assert health({"healthy": False, "ready": True, "stats_error": "unreachable"}) == "dead"


def test_a_shard_whose_stats_call_failed_shows_dashes_for_its_totals(statuses):
    """README: "the tokens and calls columns each shard's totals since it started ("-" when its stats call
    failed)": in a real status, one shard's GetStats failing puts "-" in its tokens and calls, not 0 or stale counts;
    the other shard's row keeps its numbers."""
    from elasticmoe.status_view import shard_rows

    st = json.loads(to_json(statuses[1]))
    st["shards"][0]["stats_error"] = "unreachable"
    rows = {r.split()[1]: r.split() for r in shard_rows(st, None, None, 10)[2:]}
    failed, other = rows[st["shards"][0]["id"]], rows[st["shards"][1]["id"]]
    assert failed[3:7] == ["unreach", str(st["shards"][0]["experts"]), "-", "-"], failed
    assert other[5:7] == [str(st["shards"][1]["tokens"]), str(st["shards"][1]["calls"])] and other[5] != "0"


def test_generate_failing_is_one_prefixed_line_after_the_streamed_text(monkeypatch, capsys):
    """A generate that fails prints `elasticmoe generate: error: CODE: details` (main()'s promise; it printed no
    command), and a stream cut after some text ends that text's line first (the error landed on the same line)."""
    import socket

    import grpc

    with socket.socket() as s:  # a port nobody listens on: the real client's UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli_main(["generate", "hi", "--address", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("elasticmoe generate: error: UNAVAILABLE: ") and len(err.splitlines()) == 1, err

    from elasticmoe import client as client_mod

    class Cut(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "shard gone"

    class Client:
        def __init__(self, *a, **kw):
            pass

        def stream(self, prompt, **kw):
            yield type("R", (), {"text": "partial"})()
            raise Cut()

        def close(self):
            pass

    monkeypatch.setattr(client_mod, "GenerationClient", Client)
    assert cli_main(["generate", "hi", "--stream"]) == 1
    out, err = capsys.readouterr()
    assert out == "partial\n" and err == "elasticmoe generate: error: UNAVAILABLE: shard gone\n", (out, err)


@pytest.mark.parametrize("argv", [["status", "--interval", "5"], ["status", "--json", "--interval", "0.5"]])
def test_status_refuses_an_interval_without_watch(argv, monkeypatch, capsys):
    """--interval sets the --watch frames' spacing: without --watch it was accepted and ignored (one status, at
    once), so a script asking for a status every 5 s got one; now a usage error naming both flags, said by
    `elasticmoe status` with its usage (it was the top command's, which lists no --interval)."""
    from elasticmoe import status_view

    monkeypatch.setattr(status_view, "controller_status", lambda address, app="elasticmoe": {"shards": []})
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "elasticmoe status: error: --interval: only with --watch" in err, err
    assert err.startswith("usage: elasticmoe status ") and "[--interval INTERVAL]" in err, err


def _shape(line: str) -> str:
    """A frame line with what varies from run to run (counts, ports, times, bar lengths) made uniform."""
    return re.sub(r"\d+", "9", re.sub(r"[█▏▎▍▌▋▊▉]+ *\|", "<bar>|", line.rstrip()))


def test_the_readme_frame_is_what_watch_draws(statuses):
    """README (`status --watch`): "a frame of the two-shard demo cluster that tests/test_status_view.py runs
    in-process" is this cluster's second watch frame (2 s after the first): the same lines, titles and column
    positions; only the counts, ports, times and bar lengths may differ."""
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"```\n(placement version .*?)```", readme, flags=re.S).group(1).rstrip("\n").splitlines()
    before, st = statuses
    drawn = render(st, before, 2.0).splitlines()
    assert [_shape(line) for line in shown] == [_shape(line) for line in drawn]
    rows = [(a, b) for a, b in zip(shown, drawn) if a.endswith("|")]
    assert len(rows) == 2 and all(a.index("|") == b.index("|") for a, b in rows)  # the columns' widths
