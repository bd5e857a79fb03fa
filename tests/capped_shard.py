"""A shard script in a process of its own that caps its address space (RLIMIT_AS) on the test's word: real OOM."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator

# A capped process's malloc: one arena, large blocks mmapped (and unmapped when freed). Without it a thread that found
# the arena busy mapped another (64 MiB of address space) after the cap, and the cap's windows moved run to run.
MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}

# The end of a shard script whose server is `server` on `port`: the protocol CappedShard speaks (argv[2]: the room
# left above the warmed-up size, in bytes)
CAP_ON_WORD = r"""
print(json.dumps({"port": port}), flush=True)
sys.stdin.readline()  # the test has warmed the server up: cap the address space just above its size
size = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmSize"].split()[0]) << 10
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[2]), resource.RLIM_INFINITY))
print(json.dumps({"capped": size}), flush=True)
sys.stdin.readline()
server.stop(None).wait(10)
"""


class CappedShard:
    """The process of a script that prints {"port": P}, reads a line and caps itself (printing {"capped": size}),
    then reads a line and stops its server."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.port = json.loads(proc.stdout.readline())["port"]
        self.address = f"127.0.0.1:{self.port}"

    def cap(self) -> None:
        """Once the test has warmed the server up: the script caps its address space just above its size."""
        self.proc.stdin.write("cap\n")
        self.proc.stdin.flush()
        assert "capped" in json.loads(self.proc.stdout.readline())


@contextlib.contextmanager
def capped_shard(script: str, *args, env: dict | None = None) -> Iterator[CappedShard]:
    """Run `script` with `args`; stop it (or kill it) on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield CappedShard(proc)
    finally:
        try:
            proc.communicate("stop\n", timeout=30)
        finally:
            proc.kill()
