"""ExpertStore.load when torch's CPU allocator refuses the expert-sized temporary a read goes through (a RuntimeError,
not MemoryError): the store reads it as out of memory (model.oom, the predicate the shard's answers use too) and names
the layer and the expert, the layer left as it was; it passed torch's bare message on. In a process of its own whose
address space is capped (RLIMIT_AS): the layer's new bfloat16 storage (12 MiB) fits in ROOM, the float32 weight read
before its conversion (8 MiB more) does not, and the kernel refuses torch's allocator (ENOMEM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from elasticmoe.model.oom import CPU_OOM
from elasticmoe.model.tiny import make_tiny_model
from tests.capped_shard import MALLOC

H, INTER = 64, 32768  # one expert: w13 [2I, H] + w2 [H, I] bfloat16 = 12 MiB held; its gate [I, H] float32 read: 8 MiB
ROOM = 16 << 20  # what the process may map beyond what it has: the storage, not the temporary as well
TEMPORARY = INTER * H * 4
# one malloc arena and a fixed mmap threshold (as tests/test_shard_load_memory.py): what the cap leaves is what a load
# gets

SCRIPT = r"""
import json, resource, sys, threading, torch
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.oom import out_of_memory

torch.set_num_threads(1)  # no intra-op threads to start once capped
threading.stack_size(256 << 10)  # a progress thread maps 256 KiB, not 8 MiB
files = open_model(sys.argv[1])
store = ExpertStore(files.ckpt, files.names, files.spec, torch.bfloat16, torch.device("cpu"))  # the file: float32
layer = files.spec.moe.moe_layers[0]
store.load([])  # first use of the load path's code, outside the cap
size = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmSize"].split()[0]) << 10
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    store.load([(layer, 0)])
    out = {"raised": None}
except Exception as e:
    out = {"raised": type(e).__name__, "message": str(e), "out_of_memory": out_of_memory(e)}
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps({**out, "layer": layer, "held": store.held(), "weight_bytes": store.weight_bytes()}))
"""


def test_a_read_refused_by_the_cpu_allocator_is_out_of_memory_naming_layer_and_expert(tmp_path):
    path = make_tiny_model("mixtral", tmp_path / "m", layers=1, experts=2, hidden=H, intermediate=INTER)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(ROOM)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **MALLOC})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["raised"] == "RuntimeError", out  # torch's allocator: not a MemoryError
    assert out["out_of_memory"], out
    assert out["message"].startswith(f"layer {out['layer']}: expert 0 could not be read into the layer's new "
                                     "storage (the layer is left as it was): "), out["message"]
    assert f"{CPU_OOM}: you tried to allocate {TEMPORARY} bytes" in out["message"], out["message"]
    assert out["held"] == [] and out["weight_bytes"] == 0, out  # nothing changed
