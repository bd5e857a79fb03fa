"""`elasticmoe status` views of Controller.status(): text, JSON and a live terminal view (pure renderers + a loop)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Callable, TextIO

BAR = "█"
CLEAR = "\x1b[H\x1b[2J"  # cursor home + clear screen


def to_json(st: dict) -> str:
    """The status dict as JSON (keys sorted; anything JSON lacks, e.g. numpy scalars, as its str)."""
    return json.dumps(st, indent=2, sort_keys=True, default=str)


def health(s: dict) -> str:
    """ok | loading (registered, experts not yet loaded) | failed (registered, but its experts cannot be read from the
    checkpoint or do not fit in its memory: `load_error`; it tries again) | dead (health checks failed) | unreach
    (healthy at the last health check, but its stats call for this status failed: its counts are missing, not 0)."""
    if not s.get("healthy", False):
        return "dead"
    if s.get("stats_error"):
        return "unreach"
    if s.get("ready", False):
        return "ok"
    return "failed" if s.get("load_error") else "loading"


def load_errors(st: dict) -> list[str]:
    """One line per shard that cannot load its experts: its id and why (the file and the tensor, or the bytes that
    did not fit in memory)."""
    return [f"shard {s['id']} cannot load its experts: {s['load_error']}" for s in st.get("shards", [])
            if s.get("load_error") and not s.get("ready", False)]


def retrying(st: dict) -> list[str]:
    """One line per controller decision failing alike each try (a re-home, a scale out, a shard's revival), retried
    with a backoff: its failures in a row, the wait for the next try and why (the file and the tensor, when the
    checkpoint cannot give an expert)."""
    return [f"{name} failing ({r.get('tries')} in a row, next try in {r.get('retry_in_s')} s): {r.get('error')}"
            for name, r in sorted((st.get("retrying") or {}).items())]


def bar(value: float, top: float, width: int) -> str:
    """A bar of `width` cells filled in proportion value / top (eighth-cell resolution)."""
    eighths = round(min(1.0, value / top) * width * 8) if top > 0 and value > 0 else 0
    full, part = divmod(eighths, 8)
    return (BAR * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width)


def expert_tokens(st: dict) -> dict[tuple[int, int], int]:
    """(layer, expert) -> tokens served, summed over the shards (every copy)."""
    out: dict[tuple[int, int], int] = {}
    for s in st.get("shards", []):
        for layer, expert, n in s.get("expert_tokens", []):
            out[(layer, expert)] = out.get((layer, expert), 0) + n
    return out


def _delta(now: dict, before: dict | None) -> dict:
    """Per-key increase of cumulative counters since `before` (a shard restart resets to its new value)."""
    if before is None:
        return now
    return {k: v - before.get(k, 0) if v >= before.get(k, 0) else v for k, v in now.items()}


def _since(s: dict, prev: dict | None) -> tuple[int, dict[tuple[int, int], int]] | None:
    """(tokens, (layer, expert) -> tokens) that shard entry `s` served since the status `prev`: all it served
    without `prev` or when it joined since; None when unknown (its stats call failed now or in `prev`). Taken per
    shard: a sum over shards falls when one leaves, and the others' totals since their start showed as the interval."""
    if s.get("stats_error"):
        return None
    tokens, experts = int(s.get("tokens", 0)), {(l, e): n for l, e, n in s.get("expert_tokens", [])}
    before = next((b for b in (prev or {}).get("shards", []) if b["id"] == s["id"]), None)
    if before is None:
        return tokens, experts
    if before.get("stats_error"):
        return None
    return (_delta({0: tokens}, {0: int(before.get("tokens", 0))})[0],
            _delta(experts, {(l, e): n for l, e, n in before.get("expert_tokens", [])}))


def live_shards(st: dict) -> int:
    """Shards the routing table sends to: ready, healthy and at a position of the placement (Registry.live); not a
    dead one still registered (until its experts are re-homed, or for good with nowhere to re-home them), a
    replacement still loading, nor a spare."""
    n = st.get("num_shards") or 0
    return sum(1 for s in st.get("shards", []) if s.get("ready") and s.get("healthy") and s.get("position", n) < n)


def header(st: dict) -> list[str]:
    lines = [f"placement version {st.get('version')}  shards {live_shards(st)}/{st.get('num_shards')} "
             f"(desired {st.get('desired_shards')})  every expert placed: {st.get('complete')}  "
             f"weights moved: {st.get('bytes_moved', 0) / 1e6:.1f} MB"
             + ("  RECOVERING" if st.get("recovering") else "")]
    bal = st.get("balancedness") or []
    if bal:
        lines.append("balancedness per MoE layer (mean/max shard load): " + " ".join(f"{b:.2f}" for b in bal))
    return lines


def shard_rows(st: dict, prev: dict | None, dt: float | None, bar_width: int) -> list[str]:
    """What the columns cover, then one row per shard: position, id, address, health, experts, tokens and calls
    (totals since the shard started; "-" when its stats call failed), tokens/s and a load bar (over the interval
    since `prev`, else since the shard started)."""
    recent = {s["id"]: _since(s, prev) for s in st.get("shards", [])}
    top = max((r[0] for r in recent.values() if r), default=0)
    rate = "tok/s" if prev is not None and dt else ""
    span = f"tok/s, load: the last {dt:.0f}s" if rate else "load: since each shard started"
    rows = [f"tokens, calls: totals since each shard started; {span}",
            f"{'pos':>3}  {'shard':<20} {'address':<21} {'health':<7} {'experts':>7} {'tokens':>8} "
            f"{'calls':>6} {rate:>7}  load"]
    for s in st.get("shards", []):
        r = recent[s["id"]]  # None: not measured over the interval, no rate
        tokens = r[0] if r else 0
        per_s = f"{tokens / dt:7.0f}" if rate and r else " " * 7
        total, calls = ("-", "-") if s.get("stats_error") else (s.get("tokens", 0), s.get("calls", 0))
        rows.append(f"{s.get('position', '?'):>3}  {str(s['id'])[:20]:<20} {str(s.get('address', ''))[:21]:<21} "
                    f"{health(s):<7} {s.get('experts', 0):>7} {total:>8} {calls:>6} "
                    f"{per_s}  {bar(tokens, top, bar_width)}|")
    return rows


def hottest(st: dict, prev: dict | None, n: int = 5) -> str:
    """The `n` experts that served the most tokens (since `prev` when given), as "L1/E5: 120"."""
    got: dict[tuple[int, int], int] = {}
    for s in st.get("shards", []):
        for k, c in (_since(s, prev) or (0, {}))[1].items():
            got[k] = got.get(k, 0) + c
    top = [kv for kv in sorted(got.items(), key=lambda kv: (-kv[1], kv[0])) if kv[1] > 0][:n]
    return ", ".join(f"L{l}/E{e}: {c}" for (l, e), c in top)


def event_line(ev: dict) -> str:
    """"12:03:04 v7 removed shard=ab12 why=health check failed"."""
    extra = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("t", "event", "version"))
    when = time.strftime("%H:%M:%S", time.localtime(ev["t"])) if isinstance(ev.get("t"), (int, float)) else "--:--:--"
    return f"{when} v{ev.get('version', '?')} {ev.get('event', '?')} {extra}".rstrip()


def render(st: dict, prev: dict | None = None, dt: float | None = None, *, bar_width: int = 30,
           events: int = 6) -> str:
    """The status as text: header, shard table with load bars, the shards that cannot load their experts and why,
    the controller's decisions that keep failing, hottest experts, the last `events` events.
    With `prev` (the status `dt` seconds earlier), bars, tokens/s and hottest experts cover that interval."""
    lines = header(st) + [""] + shard_rows(st, prev, dt, bar_width)
    errors = load_errors(st) + retrying(st)
    if errors:
        lines += [""] + errors
    hot = hottest(st, prev)
    since = f" (last {dt:.0f}s)" if prev is not None and dt else ""
    lines += ["", f"hottest experts{since}: {hot or '-'}"]
    evs = st.get("events") or []
    if events and evs:
        lines += ["", "recent events:"] + ["  " + event_line(e) for e in evs[-events:]]
    return "\n".join(lines)


def watch(fetch: Callable[[], dict], interval: float = 2.0, out: TextIO | None = None,
          iterations: int | None = None, clock: Callable[[], float] = time.monotonic, as_json: bool = False) -> int:
    """Redraw `render(fetch())` every `interval` s until Ctrl-C (or `iterations` frames); 0 on exit.
    On a terminal each frame replaces the last; otherwise frames are separated by a blank line.
    as_json: each status as one line of JSON instead (a failed fetch: a line on stderr), for scripts."""
    prev, t_prev, frame = None, 0.0, 0
    out = out or sys.stdout  # at call time (stdout may have been replaced since import)
    tty = out.isatty()
    try:
        while iterations is None or frame < iterations:
            if as_json:
                try:
                    out.write(json.dumps(fetch(), sort_keys=True, default=str) + "\n")
                except Exception as e:  # noqa: BLE001 - keep watching, as the text view does
                    print(f"status unavailable: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
                out.flush()
                frame += 1
                if iterations is None or frame < iterations:
                    time.sleep(interval)
                continue
            try:
                st, t = fetch(), clock()
                text = render(st, prev, t - t_prev if prev is not None else None)
            except Exception as e:  # noqa: BLE001 - e.g. the controller restarting: say so, keep watching
                st, text = None, f"status unavailable: {type(e).__name__}: {str(e)[:300]}"
            stamp = time.strftime("%H:%M:%S")
            out.write((CLEAR if tty else ("\n" if frame else "")) + f"elasticmoe status  {stamp}  "
                      f"(every {interval:g}s, Ctrl-C to quit)\n\n{text}\n")
            out.flush()
            if st is not None:
                prev, t_prev = st, t
            frame += 1
            if iterations is None or frame < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0


def controller(address: str, app: str = "elasticmoe"):
    """A DeploymentHandle to application `app`'s controller on the Ray cluster at `address` (connects this
    process)."""
    from elasticmoe.local_cluster import use_local_ray_env

    use_local_ray_env(address)  # before Ray's import, which reads them
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    # Serve's own logger (INFO, its own stderr handler) would print its router's start-up line into a CLI's output
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return serve.get_deployment_handle("Controller", app_name=app)


def controller_status(address: str, app: str = "elasticmoe") -> dict:
    """Controller.status() of application `app` on the Ray cluster at `address` (connects this process)."""
    return controller(address, app).status.remote().result(timeout_s=30)


def fetcher(address: str, app: str) -> Callable[[], dict]:
    """A function returning the controller's status (one Ray connection, reused)."""
    first: dict[str, Any] = {"st": controller_status(address, app)}

    def fetch() -> dict:
        if "st" in first:
            return first.pop("st")
        from ray import serve

        return serve.get_deployment_handle("Controller", app_name=app).status.remote().result(timeout_s=30)

    return fetch
