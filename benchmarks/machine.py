"""The machine a benchmark ran on, for its JSON: its CPU model (ratios travel, times do not), where its CPU time
went."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """/proc/cpuinfo's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def stamp() -> dict:
    """What every result JSON records about its run: the CPU model, the CPU count and the date (local, with offset)."""
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(path: str, args: dict, result: dict) -> Path:
    """Write a benchmark's result JSON at `path` (its folder made): stamped (`stamp`), its command-line `args`, then
    `result`; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**stamp(), **result, "args": args}, indent=2))
    print(f"wrote {out}")
    return out


def _role(cmdline: str) -> str | None:
    """A process's role in a served run, from its command line; None for what is not ours or Ray's."""
    for marker, role in ((":Gateway", "gateway"), (":ExpertShard", "expert shards"), (":Controller", "controller"),
                         ("ProxyActor", "Serve proxy")):
        if marker in cmdline:
            return role
    return "other Ray" if ("ray::" in cmdline or "/ray/" in cmdline) else None


def _cpu_seconds(stat: str, tick: int) -> float:
    """User + system CPU seconds from the text of a /proc/<pid>/stat."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        return _cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))


def cpu_seconds_by_role(client_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by every live process, grouped by role: gateway, expert shards, our
    controller, Serve's proxy, other Ray processes, and the benchmark's own (client_pid). Linux /proc; {} elsewhere."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmdline = f.read().replace("\0", " ")
        except OSError:
            continue  # it ended meanwhile
        role = "client (this benchmark)" if int(pid) == client_pid else _role(cmdline)
        if role is not None:
            out[role] = out.get(role, 0.0) + _cpu_seconds(stat, tick)
    return out


def cores_used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Average cores each role kept busy between two cpu_seconds_by_role snapshots `seconds` apart."""
    return {role: round((after[role] - before.get(role, 0.0)) / seconds, 3) for role in after}
