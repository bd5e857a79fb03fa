"""The chart's values the documents name exist (values.yaml or values.schema.json), and the defaults the chart's README
and the app's defaults state are values.yaml's (tests/test_doc_claims.py: the rest of the documents' claims)."""

from __future__ import annotations

import functools
import re

import yaml

from tests.doc_util import CHART, REPO, _app_arg_model, _code


@functools.cache
def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _schema_has(path: list[str]) -> bool:
    import json

    node = json.loads((CHART / "values.schema.json").read_text())
    for part in path:
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif node.get("additionalProperties") not in (None, False):
            return True
        else:
            return False
    return True


def _values_has(path: list[str]) -> bool:
    node = _values()
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and not node:  # a free-form map (annotations, labels, options)
            return True
        else:
            return _schema_has(path)
    return True


def _is_app_arg(name: str) -> bool:
    return _app_arg_model(name) is not None


def test_helm_values_named_in_the_docs_exist():
    top = set(_values())
    docs = [REPO / "README.md", REPO / "docs" / "DEPLOY.md", REPO / "docs" / "SECURITY.md", CHART / "README.md",
            CHART / "templates" / "NOTES.txt"]
    named = set()
    for path in docs:
        for where, code, _ in _code(path):
            for token in re.findall(r"(?<![\w.$/-])([a-z][A-Za-z0-9]*(?:\.[A-Za-z][\w]*)+)", code):
                if token.split(".")[0] in top and any(c.isupper() for c in token) or token.split(".")[0] in (
                        "workers", "head", "model", "limits", "autoscaling", "upgrade", "serve", "writable"):
                    named.add((where, token))
    assert len(named) > 40
    # app args share some top-level names with the chart's values (limits.*, autoscaling.*): snake_case is theirs
    files = (".json", ".safetensors", ".yaml", ".py")  # a checkpoint's or the repo's file names (model.safetensors)
    missing = [(w, t) for w, t in named if "_" not in t and not _is_app_arg(t) and not _values_has(t.split("."))
               and not t.endswith(files)]
    assert missing == [], missing


def test_helm_readme_defaults_are_the_values_defaults():
    """The chart README's table: a row naming one value and one default states values.yaml's default."""
    values = _values()
    text = (CHART / "README.md").read_text()
    checked = 0
    for key, default in re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", text, flags=re.M):
        node = values
        for part in key.split("."):
            node = node[part]
        want = {"null": None, "true": True, "false": False, '""': ""}.get(default, default)
        assert node == want or str(node) == default, f"helm README: {key} default {default!r}, values.yaml {node!r}"
        checked += 1
    assert checked >= 8
    limits = values["limits"]
    assert [limits[k] for k in ("maxNumSeqs", "maxModelLen", "maxQueue", "maxNumBatchedTokens",
                                "expertTimeoutSeconds")] == [16, None, 64, 2048, 5]
    assert "| `limits.*` | 16 / `null` / 64 / 2048 / 5 |" in text
    assert values["expertPort"] == {"start": 20100, "end": 20199}
    assert values["directGrpc"]["port"] == 9100 and "`directGrpc.port` (9100)" in text
    assert values["writable"] == {"tmpSizeLimit": "16Gi", "cacheSizeLimit": "4Gi"}


def test_helm_limits_defaults_are_the_app_defaults():
    """The chart's limit defaults are AppArgs' (the README quotes one set of numbers for both); maxModelLen is
    null, written as nothing, so the app's own default holds (2048, or the model's context if shorter)."""
    from elasticmoe.config import Limits

    limits, app = _values()["limits"], Limits()
    assert (limits["maxNumSeqs"], limits["maxQueue"], limits["maxNumBatchedTokens"],
            limits["expertTimeoutSeconds"]) == (app.max_num_seqs, app.max_queue, app.max_num_batched_tokens,
                                                app.expert_timeout_s)
    assert limits["maxModelLen"] is None and "if shorter" in Limits.model_fields["max_model_len"].description


def test_the_old_clusters_deletion_delay_defaults_as_the_readme_says():
    """Chart README (Upgrades): "The deletion delay defaults to the request timeout (`serve.requestTimeoutSeconds`,
    600 s without one) plus `rayService.drainMarginSeconds`" (tests/test_helm_values.py: a shorter explicit value fails
    the render, and the production values' delay covers their timeout)."""
    from tests.helm_util import _objects, _one, _render

    readme = " ".join((CHART / "README.md").read_text().split())
    assert ("The deletion delay defaults to the request timeout (`serve.requestTimeoutSeconds`, 600 s without one) "
            "plus `rayService.drainMarginSeconds`") in readme
    v = _values()
    assert v["serve"]["requestTimeoutSeconds"] is None and v["rayService"]["rayClusterDeletionDelaySeconds"] is None
    margin = v["rayService"]["drainMarginSeconds"]
    for serve, want in (({}, 600 + margin), ({"requestTimeoutSeconds": 90.5}, 91 + margin)):
        rs = _one(_objects(_render({"serve": serve} if serve else None)), "RayService")
        assert rs["spec"]["rayClusterDeletionDelaySeconds"] == want, serve
