"""docs/DEPLOY.md: every command it shows is checked here (against the cluster, Serve and chart files it names), or
named as one that needs a cloud, a Kubernetes cluster, Docker or a free Ray port."""

from __future__ import annotations

import re
import shlex

from tests.test_deploy_configs import (CHART_DIR, CLUSTER_FILES, NAMESPACE, RELEASE, ROOT, _deployment_args, _downloads,
                                       _load, _node_commands, _prepare_and_validate)

DOC = ROOT / "docs" / "DEPLOY.md"
# Commands a machine without a cloud, a Kubernetes cluster, Docker or a free Ray port cannot run (the tiny
# `serve deploy` runs end to end in tests/test_wheel.py; `pip wheel` is the wheel fixture there).
NOT_HERE = ("docker ", "ray exec cluster/aws.yaml 'serve status'", "ray exec cluster/aws.yaml 'serve shutdown",
            "ray down ", "ray dashboard ", "RAY_AUTH_MODE=disabled RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=4194304 "
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=elasticmoe.rpc.serve_http_proxy:middlewares ray start",
            "serve deploy deployments/tiny.yaml",
            "serve status", "serve shutdown", "elasticmoe generate", "curl ", "pip wheel --no-deps -w dist .")


def _doc_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.rstrip("&").strip() for line in lines if line]


def _helm_values(words: list[str]) -> dict:
    import helm_python as helm

    from tests.test_helm_values import _merge

    values: dict = {}
    for flag, arg in zip(words, words[1:]):
        if flag == "-f":
            values = _merge(values, helm.values_from_yaml((ROOT / arg).read_text()))
        elif flag == "--set":
            values = _merge(values, helm.parse_set_string(arg))
    return values


def _check_helm_command(words: list[str]) -> None:
    import helm_python as helm

    from tests.kuberay_rules import rayservice_errors
    from tests.helm_util import _check_rayservice, _objects, _one

    assert words[words.index("-n") + 1] == NAMESPACE and words[2] == RELEASE and words[3] == "./helm/elasticmoe"
    values = _helm_values(words)
    rendered = helm.Chart.load(str(CHART_DIR)).render(values or None, name=RELEASE, namespace=NAMESPACE)
    rs = _one(_objects(rendered), "RayService")
    _check_rayservice(rs)
    assert rayservice_errors(rs) == []
    if "--set" in words and "modelCache.existingClaim=my-weights" in words:
        assert values["modelCache"]["type"] == "existingClaim"


def test_deploy_doc_commands_are_checked():
    commands = _doc_commands()
    assert len(commands) > 20
    prod = _load(CHART_DIR / "values-gpu-production.yaml")
    fullname = f"{RELEASE}-elasticmoe"
    checked = set()
    for cmd in commands:
        words = shlex.split(cmd.split(" && ")[0]) if not cmd.startswith("HF_HOME=") else []
        if cmd.startswith(("helm install ", "helm upgrade ", "helm template ")):
            _check_helm_command(words)
        elif cmd.startswith("ray up -y cluster/"):
            _prepare_and_validate(_load(ROOT / words[3]))
        elif cmd.startswith("ray exec cluster/") and "serve deploy" in cmd:
            cluster = _load(ROOT / words[2])
            deployment = re.search(r"deployments/(\S+\.yaml)", words[3]).group(1)
            assert cluster["file_mounts"]["~/elasticmoe/deployments"] == "./deployments"
            args = _deployment_args(deployment)
            downloads = [d for cmds in _node_commands(_prepare_and_validate(cluster)).values()
                         for d in _downloads(cmds)]
            assert any(d["repo"] == args.model and d["revision"] == args.revision and "*.safetensors" in d["include"]
                       for d in downloads), f"{words[2]} never downloads {args.model}@{args.revision}"
        elif cmd.startswith("HF_HOME=/models"):  # exactly what a node type runs (run offline in a test above)
            setup = [" ".join(c.split()) for f in CLUSTER_FILES for cmds in
                     _node_commands(_prepare_and_validate(_load(f))).values() for c in cmds]
            assert " ".join(cmd.split()) in setup, cmd
        elif cmd.startswith("test -s ~/.config/elasticmoe/ray_token || openssl rand"):
            assert all(_load(f)["file_mounts"]["~/.ray/auth_token"] == "~/.config/elasticmoe/ray_token"
                       for f in CLUSTER_FILES)
        elif cmd.startswith("python -m elasticmoe.rpc.tls "):  # run in tests/test_tls.py
            assert all(_load(f)["file_mounts"]["~/elasticmoe/tls"] == f"{words[3]}/node" for f in CLUSTER_FILES)
        elif cmd.startswith("mkdir -p ~/.config/elasticmoe"):
            assert all(_load(f)["file_mounts"]["~/elasticmoe/hf_token"] == "~/.config/elasticmoe/hf_token"
                       for f in CLUSTER_FILES) and "~/.config/elasticmoe/hf_token" in cmd
        elif cmd.startswith("kubectl -n llm create secret generic ") and "--from-file=" in cmd:
            keys = prod["apiKeys"]
            assert words[6] == keys["existingSecret"] and words[7].startswith(f"--from-file={keys['key']}=")
        elif cmd.startswith("kubectl -n llm create secret generic "):
            secret = prod["model"]["download"]["hfTokenSecret"]
            assert words[6] == secret["name"] and words[7].startswith(f"--from-literal={secret['key']}=")
        elif cmd.startswith("kubectl -n llm get rayservice "):
            assert words[4:6] == ["rayservice", fullname]
        elif cmd.startswith("kubectl -n llm port-forward svc/"):
            assert words[4] == f"svc/{fullname}-serve-svc" and {w.split(":")[0] for w in words[5:]} == {"9000", "8000"}
        else:
            assert cmd.startswith(NOT_HERE), f"docs/DEPLOY.md command with no check: {cmd}"
            continue
        checked.add(cmd.split()[0] if not cmd.startswith("HF_HOME") else "hf")
    assert {"helm", "ray", "hf", "kubectl", "mkdir", "test", "python"} <= checked
