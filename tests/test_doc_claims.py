""""A README claim is a test": the names the documents give exist and are spelled as the code spells them.

For README.md, docs/*.md, the chart's README and NOTES.txt, benchmarks/KERNELS.md and the comments of the Serve,
cluster and Helm values files: every `make` target, every `elasticmoe ...` command line (parsed by the CLI's own
parser), every `python -m` module, every repository path, every app-args field (with its value, validated by
`AppArgs`), every ELASTICMOE_* variable and every test named; and the defaults they state.
Helm values: tests/test_doc_helm_claims.py. In-process and fast: no Ray, no model.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.doc_util import COMMENTED, MARKDOWN, REPO, _all_code, _code, _rel

SUBCOMMANDS = ("demo", "generate", "status", "scale", "offline", "make-tiny-model")


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def test_make_targets_named_in_the_docs_exist():
    targets = _make_targets()
    named = {(where, t) for path in MARKDOWN for where, code, _ in _code(path)
             for t in re.findall(r"(?:^|[\s;&(])make ([a-z][\w-]*)", code)}
    assert len(named) > 10
    assert [(where, t) for where, t in named if t not in targets] == []


def test_every_make_target_is_phony():
    phony = set(re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1).split())
    assert _make_targets() - {"$(VENV)/.installed"} <= phony


def _cli_commands() -> list[tuple[str, str, bool]]:
    found = []
    pattern = re.compile(r"(?:^|[\s'(])(?:[\w./]*/)?elasticmoe ((?:%s)\b[^#`]*)" % "|".join(SUBCOMMANDS))
    for where, code, whole in _all_code():
        for m in pattern.finditer(code):
            found.append((where, m.group(1).strip().rstrip("&'").strip(), whole))
    return found


def test_cli_command_lines_in_the_docs_parse():
    """Whole command lines parse with the CLI's own parser; a flag named in prose exists on its subcommand."""
    from elasticmoe.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "cmd").choices
    commands = _cli_commands()
    assert {c.split()[0] for _, c, _ in commands} >= {"demo", "generate", "status"}
    for where, command, whole in commands:
        words = shlex.split(re.sub(r"\{\{.*?\}\}", "9000", command))  # NOTES.txt's template actions
        sub = subparsers[words[0]]
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in sub._option_string_actions, f"{where}: `elasticmoe {words[0]}` has no {flag}"
        if whole:
            try:
                parser.parse_args(words)
            except SystemExit:
                pytest.fail(f"{where}: `elasticmoe {command}` does not parse")


def test_python_modules_named_in_the_docs_exist():
    named = {(where, m) for where, code, _ in _all_code() for m in re.findall(r"python3? -m ([\w.]+)", code)}
    assert any(m == "elasticmoe.rpc.tls" for _, m in named)
    for where, module in named:
        if module.split(".")[0] == "elasticmoe":
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"


def test_import_path_exists():
    assert re.search(r"^def build_app\(", (REPO / "elasticmoe" / "app.py").read_text(), flags=re.M)
    for path in MARKDOWN + COMMENTED:
        for target in re.findall(r"elasticmoe\.app:(\w+)", path.read_text()):
            assert target == "build_app", f"{_rel(path)}: elasticmoe.app:{target}"


# Files that are not the repository's: a checkpoint's, a Hub repository's, the run's, another project's.
NOT_OURS = {"config.json", "model.safetensors.index.json", "generation_config.json", "merges.txt", "tokenizer.model",
            "api-keys.txt", "benchmark_moe.py", "tls.key", "tls.crt", "ca.crt", "ca.key"}
PATH_ROOTS = ("elasticmoe/", "tests/", "benchmarks/", "deployments/", "cluster/", "helm/", "docs/", "protos/",
              ".ci/", "kernels/", "gateway/", "rpc/", "model/", "autoscaler/", "engine/", "placement/",
              "dashboards/", "templates/")
PATH_LIKE = re.compile(r"^[\w.<>{}*,/-]+\.(?:py|md|yaml|json|c|proto|txt|sh|toml|pyi|tpl|png)$"
                       r"|^[\w.-]+/[\w./<>{}*,-]*$")


def _expand(token: str) -> list[str]:
    """`cluster/{aws,gcp}.yaml` -> both; `<model>` and `*` -> glob wildcards."""
    m = re.search(r"\{([^}]*)\}", token)
    if m:
        return [e for alt in m.group(1).split(",") for e in _expand(token[:m.start()] + alt + token[m.end():])]
    return [re.sub(r"<[^>]*>", "*", token)]


@functools.cache
def _files() -> tuple[Path, ...]:
    return tuple(p for p in REPO.rglob("*") if not {".git", ".venv", ".cache", "__pycache__"} & set(p.parts))


def _exists(token: str, base: Path) -> bool:
    if token.startswith("../"):  # a relative link
        return (base / token).resolve().exists()
    tracked = _files()
    for pattern in _expand(token.rstrip("/").lstrip("/")):
        for root in (REPO, REPO / "elasticmoe", base):
            if list(root.glob(pattern)):
                return True
        if "/" not in pattern and any(p.match(pattern) for p in tracked):
            return True
    return False


def test_repository_paths_named_in_the_docs_exist():
    missing = []
    for path in MARKDOWN + COMMENTED:
        tokens = [(w, t.replace("\0", ",")) for w, code, _ in _code(path)
                  for t in re.split(r"[\s,;:()`'\"=]+", re.sub(r"\{[^}]*\}", lambda m: m[0].replace(",", "\0"), code))
                  if PATH_LIKE.match(t.rstrip(".")) and (t.startswith(PATH_ROOTS) or "/" not in t)]
        tokens += [(_rel(path), t) for t in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())]
        for where, token in tokens:
            token = token.rstrip(".")
            if token in NOT_OURS or token.startswith(("E=", "$", "..")) or not token:
                continue
            if not _exists(token, path.parent):
                missing.append((where, token))
    assert missing == [], missing


NESTED = ("limits", "autoscaling", "direct_grpc", "gateway_resources", "shard_resources")


def _app_arg_claims() -> list[tuple[str, str, str]]:
    """(where, dotted name, value or '') for every code span naming an app-args field, e.g. `limits.transport:
    unary`, `direct_grpc: {port: 9100}`, `direct_grpc.drain_s`."""
    from elasticmoe.config import AppArgs

    fields = set(AppArgs.model_fields)
    claims = []
    app_docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the chart's README: Helm values
    for where, code, whole in (c for path in app_docs for c in _code(path)):
        if whole:
            continue
        m = re.match(r"^([a-z_]+(?:\.[a-z_]+)*)(?::\s*(.+))?$", code.strip())
        name = m.group(1) if m else ""
        if m and name.split(".")[0] in fields and (m.group(2) or "." in name) and (
                "." not in name or name.split(".")[0] in NESTED):  # `model.download` is a Helm value
            claims.append((where, m.group(1), m.group(2) or ""))
    return claims


def test_app_args_named_in_the_docs_exist_and_take_the_values_shown():
    from pydantic import BaseModel

    from elasticmoe.config import AppArgs

    claims = _app_arg_claims()
    names = {name for _, name, _ in claims}
    assert {"limits.transport", "limits.micro_batches", "limits.failover_s", "direct_grpc.drain_s",
            "direct_grpc.host", "expert_copies", "insecure_internal"} <= names
    for where, name, value in claims:
        model: type[BaseModel] = AppArgs
        parts = name.split(".")
        for i, part in enumerate(parts):
            assert model is not None and part in model.model_fields, f"{where}: no app arg {name}"
            ann = model.model_fields[part].annotation
            nested = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            model = nested[0] if nested else None
        if value:
            args: dict = yaml.safe_load(value)
            for part in reversed(parts):
                args = {part: args}
            if parts[0] == "direct_grpc" and isinstance(args["direct_grpc"], dict):
                args["direct_grpc"].setdefault("port", 9100)
            AppArgs(**{"model": "m", **args})  # raises on a wrong name or value


def test_environment_variables_named_in_the_docs_are_read():
    sources = "\n".join(p.read_text(errors="ignore") for root in ("elasticmoe", "helm", "cluster", "benchmarks")
                        for p in (REPO / root).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".tpl",
                                                                                           ".sh", ".c", ".txt"))
    sources += (REPO / "Makefile").read_text() + (REPO / "Dockerfile").read_text()
    named = {(where, v) for where, code, _ in _all_code()
             for v in re.findall(r"\b(ELASTICMOE_[A-Z0-9_]*[A-Z0-9])", code)}
    assert len(named) > 5
    assert [(w, v) for w, v in named if v not in sources] == []


def test_tests_named_in_the_docs_exist():
    tests = {p.stem: p.read_text() for p in (REPO / "tests").glob("*.py")}
    everything = "\n".join(tests.values())
    for where, code, _ in _all_code():
        for module, name in re.findall(r"tests/(\w+)\.py::(\w+)", code):
            assert module in tests and f"def {name}(" in tests[module], f"{where}: no {module}.py::{name}"
        for name in re.findall(r"(?<![/\w])(test_\w+)(?!\.py)\b", code):
            assert f"def {name}(" in everything or name in tests, f"{where}: no test named {name}"


def test_defaults_stated_in_the_readme():
    from elasticmoe.cli import build_parser
    from elasticmoe.config import GATEWAY_DRAIN_S, DirectGrpc, Limits
    from elasticmoe.model.pipeline import default_micro_batches

    readme = (REPO / "README.md").read_text()
    assert "`direct_grpc.drain_s` (default 600 s" in readme
    assert DirectGrpc(port=1).drain_s == GATEWAY_DRAIN_S == 600
    assert "127.0.0.1 unless `direct_grpc.host` says otherwise" in readme and DirectGrpc(port=1).host == "127.0.0.1"
    from elasticmoe.gateway import direct_ingress as d

    said = " ".join(readme.split())
    assert "`direct_grpc.max_connections` client connections (default 256;" in said
    assert "`direct_grpc.idle_s` (default 300 s;" in said and (DirectGrpc(port=1).max_connections,
                                                                 DirectGrpc(port=1).idle_s) == (256, 300)
    assert "not begun HTTP/2 within 10 s" in said and "(sent after 60 s silent" in said and "for 20 s:" in said
    assert (d.HANDSHAKE_S, d.KEEPALIVE_S, d.KEEPALIVE_TIMEOUT_S) == (10, 60, 20)
    assert "The socket transport is the default (`limits.transport: socket`)" in readme
    assert Limits().transport == "socket"
    assert "(default 2 on CUDA, 1 on CPU)" in readme and Limits().micro_batches is None
    assert (default_micro_batches("cuda"), default_micro_batches("cpu")) == (2, 1)
    assert "redraws every `--interval` seconds (default 2)" in readme
    status = build_parser().parse_args(["status"])
    assert status.interval == 2 and status.address == "auto"
    assert build_parser().parse_args(["generate", "x"]).address == "127.0.0.1:9000"  # "gRPC :9000"
    demo = build_parser().parse_args(["demo"])
    assert demo.model == "tiny:demo" and demo.config is None  # deployments/tiny.yaml (test_deploy_configs)


def test_numbers_stated_in_the_security_doc_and_readme():
    """The numbers docs/SECURITY.md and the README give for key reloads, certificates, hedging and `n`."""
    import inspect

    from elasticmoe.gateway import auth
    from elasticmoe.gateway.dispatcher import GrpcDispatcher
    from elasticmoe.gateway.openai_protocol import MAX_N
    from elasticmoe.rpc import tls

    security, readme = (REPO / "docs" / "SECURITY.md").read_text(), (REPO / "README.md").read_text()
    assert "re-read\nwithin a second" in security or "re-read within a second" in security
    assert auth.RELOAD_S <= 1.0
    assert "look at the files every 30 s" in security
    assert inspect.signature(tls.Renewal).parameters["period_s"].default == 30.0
    assert "CA 10 years, certificate 1 year, renewed a week before it expires" in security
    assert (tls.CA_DAYS, tls.LEAF_DAYS, tls.RENEW_DAYS) == (3650, 365, 7)
    assert "a straggler past 4x the median round trip" in readme
    assert inspect.signature(GrpcDispatcher).parameters["hedge_factor"].default == 4.0
    assert "`n` up to 16" in readme and MAX_N == 16


def test_readme_layers_are_the_layering_tests():
    """The README's "Imports go downward (tests/test_layering.py): a, b -> c -> ..." is test_layering.LAYERS."""
    from tests.test_layering import LAYERS

    text = " ".join((REPO / "README.md").read_text().split())
    chain = re.search(r"Imports go downward, and a test says so \(`tests/test_layering.py`\): ([\w, ->]+?);", text)
    said = [{u.strip() for u in layer.split(",")} for layer in chain.group(1).split("->")]
    assert said[::-1] == [units - {"__init__", "__main__"} for units in LAYERS]  # the package's own, named after it
    assert "`elasticmoe/__main__.py` (`python -m elasticmoe`) sits in the top layer" in text


def test_serve_options_the_readme_states():
    """README (front door): Serve sends a gateway no more calls than its places (max_num_seqs + max_queue unless
    limits.max_ongoing_requests), queues `limits.max_queued_requests` per caller, refuses with 429 + Retry-After 1,
    and a stopping gateway drains for the gateway's drain (600 s)."""
    from elasticmoe.app import build_app
    from elasticmoe.config import GATEWAY_DRAIN_S

    readme = " ".join((REPO / "README.md").read_text().split())
    assert ("Serve sends a gateway replica no more calls than its places (`limits.max_ongoing_requests`, by default "
            "`max_num_seqs + max_queue`)") in readme
    assert "HTTP 429 with `Retry-After: 1`" in readme
    limits = {"max_queued_requests": 7, "max_num_seqs": 5, "max_queue": 6}
    gateway = build_app({"model": "tiny:mixtral", "limits": limits})._bound_deployment
    assert gateway.max_ongoing_requests == 11 and gateway.max_queued_requests == 7
    assert gateway.backpressure_config.status_code == 429 and gateway.backpressure_config.retry_after_s == 1
    assert gateway._deployment_config.graceful_shutdown_timeout_s == GATEWAY_DRAIN_S
