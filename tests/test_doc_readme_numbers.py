"""Numbers and return values the README states that no other test pinned: each is checked against the code that makes
it so (the behaviour behind them: the tests each docstring names)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.doc_util import REPO

README = " ".join((REPO / "README.md").read_text().split())


def test_a_scale_in_drains_numbers():
    """"(3 tries, ...) ... cut to 15 s after the drain's call (a failed try's roll back gets a second more), the whole
    drain fits the replica's graceful shutdown (60 s)" (tests/test_controller_drain.py: the tries, the window and
    that the drain fits the shutdown)."""
    from elasticmoe.autoscaler import replace
    from elasticmoe.autoscaler.moves import ROLLBACK_DROP_S
    from elasticmoe.config import SHARD_SHUTDOWN_S

    assert "is tried again before the replica stops (3 tries," in README and replace.DRAIN_ATTEMPTS == 3
    assert "cut to 15 s after the drain's call (a failed try's roll back gets a second more)" in README
    assert replace.DRAIN_REHOME_S == 15.0 and ROLLBACK_DROP_S == 1.0
    assert "fits the replica's graceful shutdown (60 s)" in README and SHARD_SHUTDOWN_S == 60


def test_a_load_is_logged_when_it_took_at_least_a_second():
    """"one `elasticmoe.load` INFO line per load that took at least a second" (tests/test_progress.py: one line for a
    slow load, none for a fast one)."""
    from elasticmoe import progress

    assert "one `elasticmoe.load` INFO line per load that took at least a second" in README
    assert progress.MIN_LOG_S == 1.0 and progress.ENV == "ELASTICMOE_PROGRESS"


def test_the_socket_connections_thread_parks_half_a_second():
    """"the connection's own thread reads only once no caller has for 0.5 s ... and otherwise wakes twice a second"
    (tests/test_socket_reading.py: who reads, and how often the idle thread wakes)."""
    from elasticmoe.gateway.socket_reading import PARK_S

    assert "the connection's own thread reads only once no caller has for 0.5 s" in README
    assert "and otherwise wakes twice a second" in README and PARK_S == 0.5


def test_the_http2_settings_the_transport_section_names():
    """"The HTTP/2 settings (16 MiB stream window and largest frame, 1 MiB TCP reads)": the channel and server options
    (HTTP/2's largest frame is 2^24 - 1 bytes), unless ELASTICMOE_GRPC_HTTP2_TUNING=0 keeps grpc's defaults."""
    from elasticmoe.rpc.options import HTTP2_OPTIONS

    assert "(16 MiB stream window and largest frame, 1 MiB TCP reads)" in README
    opts = dict(HTTP2_OPTIONS)
    assert opts["grpc.http2.lookahead_bytes"] == 16 << 20 and opts["grpc.http2.max_frame_size"] == (16 << 20) - 1
    assert opts["grpc.experimental.tcp_read_chunk_size"] == 1 << 20
    run = subprocess.run([sys.executable, "-c", "from elasticmoe.rpc import options as o; print(o.HTTP2_TUNING)"],
                         env={"ELASTICMOE_GRPC_HTTP2_TUNING": "0", "PATH": ""}, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr


def test_offline_logits_are_float32_whatever_the_models_dtype():
    """The offline API: "logits = llm.logits(token_ids)  # [T, vocab] float32, one full forward", also for a bf16
    model (tests/test_model.py compares them with transformers')."""
    import torch

    from elasticmoe import LLM

    assert "logits = llm.logits(token_ids) # [T, vocab] float32, one full forward" in README
    llm = LLM("tiny:mixtral", dtype="bfloat16")
    ids = llm.encode("The quick brown fox")
    logits = llm.logits(ids)
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (len(ids), llm.engine.spec.vocab_size)


def test_the_heap_frozen_at_start_up_is_unfrozen_at_exit():
    """GC section: "Objects frozen are still freed by their reference counts; the heap is unfrozen at exit" (so that
    extension modules' leak checks at exit see their objects collected): an exit handler registered before the
    freeze runs after heap.py's, and finds nothing frozen."""
    assert "the heap is unfrozen at exit" in README
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('at exit', gc.get_freeze_count()))\n"
            "from elasticmoe.heap import freeze_startup_heap\n"
            "print('frozen', freeze_startup_heap() > 0)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.stdout.split("\n")[:2] == ["frozen True", "at exit 0"], (run.stdout, run.stderr)


def test_the_transformers_the_families_are_checked_against_is_the_pinned_one():
    """"Each family below is checked against transformers 5.23" (and the Status and strict-loader paragraphs say 5.23):
    the version pyproject.toml pins and this suite runs (tests/test_families*.py compare with it)."""
    import transformers

    pinned = re.search(r'"transformers==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    said = set(re.findall(r"transformers (\d+\.\d+)\b", README))
    assert said == {pinned.rsplit(".", 1)[0]} and transformers.__version__ == pinned, (said, pinned)


def test_the_mla_split_holds_no_float32_copy_on_a_gpu():
    """"On a GPU it is views of `kv_b` in the model's dtype, nothing held beside it (a float32 copy would be twice
    `kv_b`'s bytes, 64 MiB a DeepSeek-V3 layer, about 4 GiB over its 61 ...)"; on CPU a float32 copy in bf16/fp16
    (tests/test_mla_absorbed.py: the same bits either way, the half-precision error under a hundredth of the
    expand path's)."""
    import torch

    from elasticmoe.model.mla import Absorbed

    assert "On a GPU it is views of `kv_b` in the model's dtype, nothing held beside it (a float32 copy would be " \
           "twice `kv_b`'s bytes, 64 MiB a DeepSeek-V3 layer, about 4 GiB over its 61" in README
    assert "On CPU it is views of `kv_b` in float32, and in bf16/fp16 one float32 copy made at load" in README
    heads, nope, v, rank, layers = 128, 128, 128, 512, 61  # DeepSeek-V3's config.json
    kv_b = torch.empty(heads * (nope + v), rank, dtype=torch.bfloat16, device="meta")
    gpu, cpu = Absorbed.of(kv_b, heads, nope, v), Absorbed.of(kv_b, heads, nope, v, float32_copy=True)
    assert gpu.w_uk.dtype == gpu.w_uv.dtype == torch.bfloat16 and cpu.w_uk.dtype == torch.float32
    copy = (cpu.w_uk.numel() + cpu.w_uv.numel()) * 4
    assert copy == 2 * kv_b.numel() * kv_b.element_size() == 64 << 20 and round(copy * layers / 2**30) == 4
