"""Hub ids and Hugging Face cache snapshots: a `model` plus `revision` resolved once to one pinned snapshot
directory."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

_COMMIT = re.compile(r"[0-9a-f]{40}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(ValueError):
    """A model / revision that does not resolve to exactly one local snapshot; the message names the path at fault."""


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint directory and, when it is an HF cache snapshot, the commit it holds."""

    path: Path
    commit: str | None


def absent(path: Path) -> str:
    """Why file `path` is not there, for an error naming it: "missing", or, for a link that leads nowhere (a cache
    snapshot whose blob was pruned or never downloaded), where it leads."""
    if not os.path.islink(path):
        return "missing"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return f"a symlink to {os.path.realpath(path)}, which does not exist (a blob deleted, or never downloaded?)"
    return "not a file"


def hub_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (the rule of huggingface_hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def is_hub_id(model: str) -> bool:
    """`org/name` that is not a local path (relative paths start with ./ to be read as paths)."""
    return bool(_HUB_ID.fullmatch(model)) and not Path(model).expanduser().exists()


def repo_dir(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def _commit_of(repo: Path, revision: str) -> str:
    """The commit a branch / tag / commit names in a cache repo dir (refs/<revision> as `hf download` writes it)."""
    if _COMMIT.fullmatch(revision):
        return revision
    ref = repo / "refs" / revision
    if not ref.is_file():
        known = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file()) \
            if (repo / "refs").is_dir() else []
        raise HubError(f"{ref}: revision {revision!r} was never downloaded into this cache "
                       f"(known: {', '.join(known) or 'none'}); run `hf download <repo> --revision {revision}`")
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:  # a torn write, a stray binary file: name it, not a raw decode error
        raise HubError(f"{ref}: not a text file (byte {e.start} is not UTF-8); it should hold the commit hash "
                       f"`hf download` wrote") from None
    if not _COMMIT.fullmatch(commit):
        raise HubError(f"{ref}: not a commit hash ({commit[:60]!r})")
    return commit


def _in_repo(repo: Path, revision: str | None) -> Snapshot:
    """The snapshot of `revision` (default: the `main` ref, or the only snapshot) in a cache repo dir."""
    snapshots = repo / "snapshots"
    if revision is None:
        if (repo / "refs" / "main").is_file():
            revision = "main"
        else:
            dirs = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
            if len(dirs) != 1:
                raise HubError(f"{snapshots}: {len(dirs)} snapshots and no refs/main; set `revision` to pick one")
            revision = dirs[0]
    commit = _commit_of(repo, revision)
    path = snapshots / commit
    if os.path.islink(path / "config.json") and not (path / "config.json").is_file():
        raise HubError(f"{path / 'config.json'}: {absent(path / 'config.json')}")
    if not (path / "config.json").is_file():
        raise HubError(f"{path}: snapshot of revision {revision!r} is missing or has no config.json")
    return Snapshot(path, commit)


def resolve(model: str, revision: str | None = None) -> Snapshot:
    """One snapshot for `model` (hub id, cache repo dir, snapshot dir or plain dir) at `revision`.

    Deterministic: every process given the same model and revision over the same cache gets the same
    directory. A snapshot directory whose commit disagrees with `revision` is refused.
    """
    if is_hub_id(model):
        repo = repo_dir(model)
        if not repo.is_dir():
            rev = f" --revision {revision}" if revision else ""
            raise HubError(f"{repo}: {model} is not in the Hugging Face cache {hub_cache()} "
                           f"(HF_HOME / HF_HUB_CACHE); run `hf download {model}{rev}` first")
        return _in_repo(repo, revision)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise HubError(f"{model}: no such checkpoint directory, and not a hub id (org/name)")
    if (path / "snapshots").is_dir():
        return _in_repo(path, revision)
    if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name):
        if revision is not None and _commit_of(path.parent.parent, revision) != path.name:
            raise HubError(f"{path}: snapshot {path.name} is not revision {revision!r} "
                           f"({_commit_of(path.parent.parent, revision)})")
        return _checkpoint(Snapshot(path, path.name))
    if revision is not None:
        raise HubError(f"{path}: a plain checkpoint directory has no revisions; drop `revision` "
                       f"or name the hub id / cache repo directory")
    return _checkpoint(Snapshot(path, None))


def _checkpoint(snap: Snapshot) -> Snapshot:
    """`snap`, unless its directory has no config.json: refused at Serve's build, naming the file, not later by
    every replica (a hub snapshot is checked in _in_repo)."""
    config = snap.path / "config.json"
    if not config.is_file():
        why = absent(config)
        raise HubError(f"{config}: {why}" + (" (not a Hugging Face checkpoint directory)" if why == "missing" else ""))
    return snap

