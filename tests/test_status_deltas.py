"""`elasticmoe status --watch` frames across shard changes: tokens/s, bars and "hottest experts (last Ns)" cover the
interval only, when a shard leaves, when its stats call fails, and when it answers again (pure renderers over
Controller.status()-shaped dicts: tests/test_status_view.py runs them on a real controller)."""

from __future__ import annotations

import io

from elasticmoe.status_view import render, watch


def _shard(sid: str, pos: int, counts: dict[tuple[int, int], int] | None) -> dict:
    """A shard entry as Controller.status() gives it; counts None: its GetStats failed."""
    s = {"id": sid, "address": f"10.0.0.{pos}:9", "position": pos, "ready": True, "healthy": True, "experts": 8}
    if counts is None:
        s["stats_error"] = "unreachable"
    else:
        s.update(tokens=sum(counts.values()), calls=10, expert_tokens=[[l, e, n] for (l, e), n in counts.items()])
    return s


def _status(*shards: dict) -> dict:
    return {"version": 3, "complete": True, "num_shards": len(shards), "desired_shards": 2, "shards": list(shards)}


A0, B0 = {(0, 1): 1000, (0, 2): 900}, {(0, 1): 5000, (1, 4): 4000}  # both hold a copy of L0/E1
A1 = {(0, 1): 1010, (0, 2): 930}  # shard a served 10 and 30 in the last 2 s


def _hottest(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("hottest experts"))


def _row(text: str, sid: str) -> str:
    return next(line for line in text.splitlines() if f" {sid} " in line)


def test_a_shard_that_left_does_not_turn_the_others_totals_into_the_interval():
    """b left between frames: the sum over shards of L0/E1, which both held, fell, and a's 1010 since its start
    were shown as the last 2 s."""
    text = render(_status(_shard("a", 0, A1)), _status(_shard("a", 0, A0), _shard("b", 1, B0)), 2.0)
    assert _hottest(text) == "hottest experts (last 2s): L0/E2: 30, L0/E1: 10"


def test_a_shard_whose_stats_failed_leaves_the_others_interval_alone():
    text = render(_status(_shard("a", 0, A1), _shard("b", 1, None)),
                  _status(_shard("a", 0, A0), _shard("b", 1, B0)), 2.0)
    assert _hottest(text) == "hottest experts (last 2s): L0/E2: 30, L0/E1: 10"
    assert "unreach" in _row(text, "b")


def test_a_shard_answering_again_shows_no_rate_for_an_interval_it_was_not_measured_over():
    """b's stats failed in the last frame: all it served since it started is not the last 2 s (a spike of
    4500 tok/s and the longest bar); no rate for it this frame, and its counts stay out of the hottest experts."""
    B1 = {(0, 1): 5002, (1, 4): 4001}
    text = render(_status(_shard("a", 0, A1), _shard("b", 1, B1)),
                  _status(_shard("a", 0, A0), _shard("b", 1, None)), 2.0)
    assert _hottest(text) == "hottest experts (last 2s): L0/E2: 30, L0/E1: 10"
    assert "4500" not in _row(text, "b") and "█" not in _row(text, "b")
    assert "     20" in _row(text, "a") and "█" in _row(text, "a")  # 40 tokens in 2 s


def test_watch_frames_across_a_shard_leaving():
    frames = iter([_status(_shard("a", 0, A0), _shard("b", 1, B0)), _status(_shard("a", 0, A1))])
    clock = iter([0.0, 2.0])
    out = io.StringIO()
    watch(lambda: next(frames), interval=0.0, out=out, iterations=2, clock=lambda: next(clock))
    assert _hottest(out.getvalue().split("elasticmoe status  ")[2]) == "hottest experts (last 2s): L0/E2: 30, L0/E1: 10"


def test_the_hottest_experts_are_the_top_five_of_the_interval():
    before = {(0, e): 100 for e in range(8)}
    now = {(0, e): 100 + 10 * e for e in range(8)}
    text = render(_status(_shard("a", 0, now)), _status(_shard("a", 0, before)), 2.0)
    assert _hottest(text) == "hottest experts (last 2s): L0/E7: 70, L0/E6: 60, L0/E5: 50, L0/E4: 40, L0/E3: 30"


def test_json_watch_writes_one_status_a_line(monkeypatch, capsys):
    """`elasticmoe status --json --watch`: --json was ignored and a script read the text view (screen clears,
    bars); each frame is now Controller.status() as one JSON line on stdout, a failed fetch a line on stderr."""
    import json

    from elasticmoe import status_view
    from elasticmoe.cli import main

    first, second = _status(_shard("a", 0, A0)), _status(_shard("a", 0, A1))
    answers = iter([first, TimeoutError("controller restarting"), second, KeyboardInterrupt()])

    def fetch():
        a = next(answers)
        if isinstance(a, BaseException):
            raise a
        return a

    monkeypatch.setattr(status_view, "fetcher", lambda address, app: fetch)
    assert main(["status", "--json", "--watch", "--interval", "0.01"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [json.loads(json.dumps(s)) for s in (first, second)]
    assert "controller restarting" in err


def test_the_table_says_which_columns_are_totals_and_which_the_interval():
    """tokens and calls are totals since each shard started, tok/s and the bar the last interval: the header did not
    say so, and a shard whose stats call failed showed 0 tokens, 0 calls (missing counts, not an idle shard)."""
    text = render(_status(_shard("a", 0, A1), _shard("b", 1, None)),
                  _status(_shard("a", 0, A0), _shard("b", 1, B0)), 2.0)
    assert "tokens, calls: totals since each shard started; tok/s, load: the last 2s" in text.splitlines()
    assert f"{sum(A1.values()):>8} {10:>6}" in _row(text, "a")  # a's total, not the interval's 40
    assert "  -      - " in _row(text, "b") and " 0 " not in _row(text, "b")
    first = render(_status(_shard("a", 0, A0)))
    assert "tokens, calls: totals since each shard started; load: since each shard started" in first.splitlines()
