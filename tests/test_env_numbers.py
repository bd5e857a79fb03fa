"""The package's numeric environment variables: a value that is not a number of the kind asked for (`²` passes
str.isdigit() and int() refuses it) is refused with an error naming the variable, not a bare int() error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BAD = ["²", "abc", "12x", "٣"]  # '٣' (an Arabic-Indic three) is what int() reads and our docs do not mean


@pytest.mark.parametrize("raw", BAD + ["0", "-5"])
def test_the_moe_chunk_size_names_its_variable(raw, monkeypatch):
    from elasticmoe.kernels import triton_moe

    monkeypatch.setenv(triton_moe.CHUNK_ENV, raw)
    with pytest.raises(ValueError, match=f"{triton_moe.CHUNK_ENV}=.*positive number of tokens"):
        triton_moe.chunk_tokens_default()
    monkeypatch.setenv(triton_moe.CHUNK_ENV, " 64 ")
    assert triton_moe.chunk_tokens_default() == 64


LIMITS = ("ELASTICMOE_GRPC_MAX_MESSAGE_BYTES", "ELASTICMOE_STREAM_REPLY_BYTES")


@pytest.mark.parametrize("name", LIMITS)
@pytest.mark.parametrize("raw,read", [("²", None), ("0", None), ("", 64 << 20), (" 1048576 ", 1048576)])
def test_the_byte_limits_name_their_variable(name, raw, read, monkeypatch):
    """The gRPC message limit and ELASTICMOE_STREAM_REPLY_BYTES (a shard's unread stream answers, in bytes): a
    positive number of bytes, the default when unset, else an error naming the variable."""
    from elasticmoe.rpc.options import _message_bytes

    monkeypatch.setenv(name, raw)
    if read is None:
        with pytest.raises(ValueError, match=f"^{name}={raw!r}: expected a positive number of bytes$"):
            _message_bytes(name, 64 << 20)
    else:
        assert _message_bytes(name, 64 << 20) == read


IMPORTS = """
import os, sys, traceback
for setting in sys.argv[1:]:  # NAME=VALUE,...: set, then import the shard's server (again where it failed)
    os.environ.update(kv.split("=", 1) for kv in setting.split(","))
    try:
        from elasticmoe.rpc.options import MAX_MESSAGE_BYTES as m
        from elasticmoe.experts.shard_server import start_server as s
        print("imported", m, s.__defaults__[-1])
    except Exception as exc:
        print("refused", traceback.format_exception_only(exc)[-1].strip())
"""


def test_the_byte_limits_are_read_when_the_code_is_imported():
    """Any process of the cluster reads them on import (elasticmoe.rpc, the shard's server): a bad value stops the
    import naming the variable; good ones are what the gRPC options and the shard's stream bound use. One process
    imports it three times (a failed import leaves elasticmoe.rpc.options unimported, so it reads the variables
    anew), not three processes each importing torch and grpc (~3 s of CPU each)."""
    settings = [f"{LIMITS[0]}=²", f"{LIMITS[0]}=1048576,{LIMITS[1]}=²", f"{LIMITS[1]}=2097152"]
    env = {k: v for k, v in os.environ.items() if k not in LIMITS}
    run = subprocess.run([sys.executable, "-c", IMPORTS, *settings], env=env, capture_output=True, text=True,
                         timeout=120)
    lines = run.stdout.splitlines()
    assert len(lines) == 3, run.stderr
    for name, line in zip(LIMITS, lines):
        assert line.startswith("refused ") and f"{name}='²'" in line, line
    assert lines[2].split() == ["imported", "1048576", "2097152"], run.stderr


@pytest.mark.parametrize("raw", ["20100", "²-20199", "20199-20100", "a-b", "0-10", "20100-70000"])
def test_the_expert_port_range_names_its_variable(raw, monkeypatch):
    from elasticmoe.experts.shard_server import _ports

    monkeypatch.setenv("ELASTICMOE_EXPERT_PORT_RANGE", raw)
    with pytest.raises(ValueError, match=r"ELASTICMOE_EXPERT_PORT_RANGE=.*expected 'low-high'"):
        _ports(0)
    monkeypatch.setenv("ELASTICMOE_EXPERT_PORT_RANGE", "20100-20102")
    assert _ports(0) == [20100, 20101, 20102] and _ports(5) == [5]


def test_the_defaults_the_docs_state_for_them(monkeypatch):
    """benchmarks/KERNELS.md: chunks "of at most `ELASTICMOE_MOE_CHUNK_TOKENS` tokens (default 4096"; the chart's
    values.yaml: a step's share goes "in calls within the 256 MiB message limit" (ELASTICMOE_GRPC_MAX_MESSAGE_BYTES
    unset, as the chart leaves it)."""
    from elasticmoe.kernels import triton_moe
    from elasticmoe.rpc import options
    from tests.doc_util import CHART, REPO

    kernels = " ".join((REPO / "benchmarks" / "KERNELS.md").read_text().split())
    assert f"at most `{triton_moe.CHUNK_ENV}` tokens (default 4096," in kernels
    monkeypatch.delenv(triton_moe.CHUNK_ENV, raising=False)
    assert triton_moe.chunk_tokens_default() == 4096
    assert "within the 256 MiB message limit" in (CHART / "values.yaml").read_text()
    assert "ELASTICMOE_GRPC_MAX_MESSAGE_BYTES" not in (CHART / "templates" / "_pod.tpl").read_text()
    monkeypatch.delenv("ELASTICMOE_GRPC_MAX_MESSAGE_BYTES", raising=False)
    assert options._message_bytes() == 256 * options.MiB
