"""use_local_ray_env: a CLI joining the loopback cluster gets its RAY_ settings before Ray's import; a remote one
not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from elasticmoe import local_cluster as lc

KEYS = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")


@pytest.fixture
def plain_env(monkeypatch, tmp_path):
    """No RAY_ settings (a plain shell), and Ray's temp dir here: ray_current_cluster is this test's to write."""
    for k in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


@pytest.mark.parametrize("address, current, applied", [
    ("auto", "127.0.0.1:6379", True),  # the cluster start_ray made
    ("auto", None, True),  # none running: ray.init fails either way, on loopback
    ("auto", "10.0.0.5:6379", False),  # `ray up`'s head: its own settings (token auth) stand
    ("127.0.0.1:6379", "10.0.0.5:6379", True),
    ("localhost:6379", None, True),
    ("ray://127.0.0.1:10001", None, True),
    ("10.0.0.5:6379", "127.0.0.1:6379", False),
    ("ray://head.example:10001", None, False),
])
def test_applies_the_loopback_settings_only_for_the_loopback_cluster(plain_env, address, current, applied):
    if current is not None:
        plain_env.write_text(current)
    assert lc.use_local_ray_env(address) is applied
    got = {k: os.environ.get(k) for k in KEYS}
    assert got == ({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"} if applied
                   else dict.fromkeys(KEYS)), got


def test_the_cli_settles_them_before_ray_is_imported(plain_env):
    """`elasticmoe status` from a plain shell: by the time Ray is imported the settings are in place (they are read
    at import; set afterwards, the driver looked for the GCS on the node's other address and hung)."""
    plain_env.write_text("127.0.0.1:1")  # nothing listens: status fails fast, after the import we check
    probe = ("import builtins, os, sys\n"
             "real = builtins.__import__\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'ray' and 'seen' not in os.environ:\n"
             "        os.environ['seen'] = '1'\n"
             "        print('AT-IMPORT', os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'), flush=True)\n"
             "        raise SystemExit(0)\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "from elasticmoe.cli import main\n"
             "sys.exit(main(['status', '--json']))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    said = out.stdout + out.stderr  # status prints to stderr while it connects
    assert out.returncode == 0 and "AT-IMPORT 0" in said, said[-2000:]
