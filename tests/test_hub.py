"""Hub id + revision -> one pinned snapshot (elasticmoe.model.hub, app.resolve_args), on a Hugging Face cache laid
out in the test the way `hf download` writes it (blobs, snapshots/<commit>/ symlinks, refs/<branch>); no network."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from elasticmoe.app import build_app, resolve_args
from elasticmoe.config import AppArgs
from elasticmoe.model import open_model
from elasticmoe.model.hub import HubError, resolve

REPO_ID = "acme/tiny-moe"
OLD, NEW = "a" * 40, "b" * 40  # two commits of the repo; NEW has the newer mtime but `main` points at OLD


def _add_snapshot(repo: Path, commit: str, files: dict[str, bytes]) -> Path:
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_models) -> Path:
    """$HF_HOME with hub/models--acme--tiny-moe: OLD = the tiny Mixtral, NEW = the same with a longer context."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    files = {p.name: p.read_bytes() for p in tiny_models["mixtral"].iterdir() if p.is_file()}
    _add_snapshot(repo, OLD, files)
    config = json.loads(files["config.json"])
    changed = config | {"max_position_embeddings": config["max_position_embeddings"] + 1024}
    new = _add_snapshot(repo, NEW, files | {"config.json": json.dumps(changed).encode()})
    os.utime(new, (new.stat().st_mtime + 100, new.stat().st_mtime + 100))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(OLD)
    (repo / "refs" / "v2").write_text(NEW + "\n")
    return home


@pytest.fixture
def cache_env(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hf_home / "hub" / ("models--" + REPO_ID.replace("/", "--"))


def _resolve_in_subprocess(hf_home: Path, model: str, revision: str) -> str:
    code = "import sys; from elasticmoe.model.hub import resolve; print(resolve(sys.argv[1], sys.argv[2]).path)"
    env = {**os.environ, "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code, model, revision], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def test_two_processes_resolve_the_same_snapshot(hf_home, cache_env):
    """Same id + revision in two processes -> the same snapshot, the one `main` names, not the newest by mtime."""
    first = _resolve_in_subprocess(hf_home, REPO_ID, "main")
    second = _resolve_in_subprocess(hf_home, REPO_ID, "main")
    assert first == second == str(cache_env / "snapshots" / OLD)
    assert _resolve_in_subprocess(hf_home, REPO_ID, "v2") == str(cache_env / "snapshots" / NEW)
    assert _resolve_in_subprocess(hf_home, str(cache_env), OLD) == first  # repo dir + commit


def test_default_revision_is_main(cache_env):
    assert resolve(REPO_ID).path == resolve(str(cache_env)).path == cache_env / "snapshots" / OLD
    assert resolve(REPO_ID).commit == OLD


def test_offline_open_takes_the_snapshot_main_names(cache_env, tmp_path):
    """LLM(model) / open_model with a hub id or cache repo dir loads the snapshot the served app pins (refs/main),
    not the newest by mtime; a repo without main and with several snapshots is refused, naming the choice."""
    from elasticmoe.model import CheckpointError

    assert open_model(REPO_ID).ckpt.path == open_model(str(cache_env)).ckpt.path == cache_env / "snapshots" / OLD
    repo = tmp_path / "models--acme--nomain"
    for commit in (OLD, NEW):
        _add_snapshot(repo, commit, {"config.json": b"{}"})
    with pytest.raises(CheckpointError, match="2 snapshots and no refs/main"):
        open_model(str(repo))


@pytest.mark.parametrize("model, revision, message", [
    pytest.param("snap:OLD", NEW, "is not revision", id="snapshot-vs-commit"),
    pytest.param("snap:OLD", "v2", "is not revision 'v2'", id="snapshot-vs-branch"),
    pytest.param(REPO_ID, "v9", "refs/v9: revision 'v9' was never downloaded", id="unknown-branch"),
    pytest.param(REPO_ID, "c" * 40, "snapshots/" + "c" * 40, id="commit-not-downloaded"),
    pytest.param("acme/other-moe", "main", "models--acme--other-moe: acme/other-moe is not in the Hugging Face cache",
                 id="repo-not-downloaded"),
])
def test_mismatch_is_refused(cache_env, model, revision, message):
    if model == "snap:OLD":
        model = str(cache_env / "snapshots" / OLD)
    with pytest.raises(HubError, match=message.replace("(", r"\(")):
        resolve(model, revision)
    with pytest.raises(ValueError, match="model:"):
        resolve_args({"model": model, "revision": revision})


def test_matching_snapshot_and_revision_pass(cache_env):
    snap = cache_env / "snapshots" / NEW
    assert resolve(str(snap), "v2").path == resolve(str(snap), NEW).path == snap


def test_ambiguous_repo_without_main_is_refused(cache_env, tmp_path):
    repo = tmp_path / "models--acme--nomain"
    for commit in (OLD, NEW):
        _add_snapshot(repo, commit, {"config.json": b"{}"})
    with pytest.raises(HubError, match="2 snapshots and no refs/main"):
        resolve(str(repo))
    assert resolve(str(repo), NEW).path == repo / "snapshots" / NEW


def test_a_binary_ref_is_refused_naming_it(tmp_path, monkeypatch):
    """A refs/<revision> file holding bytes that are not UTF-8 (a torn write, a stray file) is a HubError naming
    it, by hub id, repo dir and snapshot + revision alike (it was a raw UnicodeDecodeError)."""
    home = tmp_path / "home"
    repo = home / "hub" / "models--acme--torn"
    _add_snapshot(repo, OLD, {"config.json": b"{}"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_bytes(b"\xff\xfe" + OLD.encode())
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    ref = str(repo / "refs" / "main")
    for model, revision in (("acme/torn", None), (str(repo), "main"), (str(repo / "snapshots" / OLD), "main")):
        with pytest.raises(HubError, match="^" + re.escape(ref) + ": not a text file"):
            resolve(model, revision)
    with pytest.raises(ValueError, match="model:"):
        resolve_args({"model": "acme/torn"})


def test_plain_directory_works_as_before(tiny_models):
    path = tiny_models["mixtral"]
    assert resolve(str(path)).path == path and resolve(str(path)).commit is None
    with pytest.raises(HubError, match="plain checkpoint directory has no revisions"):
        resolve(str(path), "main")


def test_app_pins_one_snapshot_for_every_replica(cache_env):
    """build_app resolves once; controller, shards and gateways all get the snapshot dir and its commit."""
    app = build_app({"model": REPO_ID, "revision": "v2", "shard_resources": {"accelerator_type": "H100"}})
    gateway = app._bound_deployment
    controller, shards = gateway.init_args[1], gateway.init_args[2]
    args = [gateway.init_args[0], controller._bound_deployment.init_args[0], shards._bound_deployment.init_args[0]]
    want = str(cache_env / "snapshots" / NEW)
    assert [(a["model"], a["revision"]) for a in args] == [(want, NEW)] * 3
    assert [a["served_model_name"] for a in args] == [REPO_ID] * 3  # the APIs name the hub id, not the cache path
    # The pinned snapshot opens (through the cache's symlinks) and is the v2 config, not main's.
    old = json.loads((cache_env / "snapshots" / OLD / "config.json").read_text())["max_position_embeddings"]
    assert open_model(want).config.max_position_embeddings == old + 1024
    # Accelerator types reach Ray; the controller follows the shards to where the weights are.
    assert shards._bound_deployment.ray_actor_options["accelerator_type"] == "H100"
    assert controller._bound_deployment.ray_actor_options == {"num_cpus": 0, "accelerator_type": "H100"}
    assert "accelerator_type" not in gateway.ray_actor_options


def test_tiny_models_are_not_resolved():
    assert resolve_args({"model": "tiny:mixtral"}).model == "tiny:mixtral"


@pytest.mark.parametrize("revision", ["main", "a" * 40])
def test_a_tiny_model_refuses_a_revision(revision):
    """tiny:<family> is built locally and has no revisions: a `revision` beside it was silently ignored."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"revision: .*tiny:mixtral.*no revisions"):
        AppArgs.model_validate({"model": "tiny:mixtral", "revision": revision})
    with pytest.raises(ValueError, match=r"(?s)elasticmoe app args: .*revision: "):
        resolve_args({"model": "tiny:mixtral", "revision": revision})


def test_a_directory_without_config_json_fails_the_build_naming_the_file(cache_env, tmp_path):
    """A plain directory, or a snapshot directory given as such, with no config.json (a typo'd path, a download
    of the weights only) passed Serve's build and failed later in every replica; the build (resolve_args) now
    refuses it, naming the file, as it does a hub id whose snapshot lacks one."""
    plain = tmp_path / "weights-only"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    snap = _add_snapshot(tmp_path / "models--acme--torn", OLD, {"model.safetensors": b""})
    for model in (plain, snap):
        with pytest.raises(ValueError, match="^elasticmoe app args: model: " + re.escape(f"{model / 'config.json'}: "
                                                                                          "missing")):
            resolve_args({"model": str(model)})
    assert resolve_args({"model": str(cache_env / "snapshots" / OLD)}).model == str(cache_env / "snapshots" / OLD)


def test_a_snapshot_whose_blobs_are_gone_names_the_link_and_where_it_leads(tmp_path, monkeypatch, tiny_models):
    """A cache snapshot whose links lead to blobs that are gone (`hf cache` pruned them, a download cut short):
    config.json was 'missing (not a Hugging Face checkpoint directory)' or 'snapshot ... is missing or has no
    config.json', and model.safetensors 'missing', though each is there, a link to nothing; the error now says so
    and names the blob."""
    from elasticmoe.model import CheckpointError

    files = {p.name: p.read_bytes() for p in tiny_models["mixtral"].iterdir() if p.is_file()}
    repo = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snap = _add_snapshot(repo, OLD, files)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(OLD)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    weights = os.path.realpath(snap / "model.safetensors")
    os.unlink(weights)
    with pytest.raises(CheckpointError, match=re.escape(f"{snap / 'model.safetensors'}: a symlink to {weights}, which "
                                                        "does not exist")):
        open_model(REPO_ID)
    config = os.path.realpath(snap / "config.json")
    os.unlink(config)
    for model in (REPO_ID, str(snap)):
        with pytest.raises(HubError, match=re.escape(f"{snap / 'config.json'}: a symlink to {config}, which does not "
                                                     "exist")):
            resolve(model)
