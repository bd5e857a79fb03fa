"""Every name an operator reads exists and is the code's: ELASTICMOE_* variables, app-args key paths, CLI flags, Helm
values and metric names, taken by regex from the documents, their comments and the CLI's --help texts, and back.

tests/test_doc_claims.py checks the command lines, code spans and values the documents show; this file checks the
names wherever they stand (prose, fences, comments, help texts). In-process and fast: no Ray, no model.
"""

from __future__ import annotations

import ast
import functools
import re

import yaml

from tests.doc_util import CHART, COMMENTED, MARKDOWN, REPO, _app_arg_model, _rel

PACKAGE = REPO / "elasticmoe"
APP_ARG_GROUPS = ("limits", "autoscaling", "direct_grpc", "gateway_resources", "shard_resources")
# Names in the documents that are deliberately not elasticmoe's env variables, flags or metrics, with the reason.
NOT_METRICS = {"elasticmoe_gateway": "the custom Ray resource each gateway pod declares (config.py, the chart)"}
OTHER_TOOLS_FLAGS = {  # flags of the other programs the documents run, by program
    "ray start / up / dashboard": {"--head", "--port", "--object-manager-port", "--autoscaling-config",
                                   "--dashboard-host", "--metrics-export-port", "--node-ip-address", "--remote-port"},
    "helm / kubectl": {"--create-namespace", "--set", "--set-string", "--from-file", "--from-literal", "--dry-run"},
    "pip / uv / hf download": {"--no-deps", "--python", "--index-url", "--quiet", "--user", "--upgrade", "--include",
                               "--revision"},
    "docker (ray up's run_options)": {"--net", "--ulimit"},
    "gcloud": {"--project", "--filter"},
    "py-spy": {"--gil"},
}


def _help_texts() -> str:
    """The CLI's descriptions and every option's help, as `elasticmoe <sub> --help` prints them."""
    from elasticmoe.cli import build_parser

    out = []

    def walk(parser, name: str) -> None:
        out.append(f"{name}: {parser.description or ''} {parser.epilog or ''}")
        for action in parser._actions:
            out.append(f"{name} {' '.join(action.option_strings)}: {action.help or ''}")
            if isinstance(getattr(action, "choices", None), dict):
                for sub, subparser in action.choices.items():
                    out.append(f"{name} {sub}: {action.help or ''}")
                    walk(subparser, f"{name} {sub}")

    walk(build_parser(), "elasticmoe")
    return "\n".join(out)


@functools.cache
def _documents() -> dict[str, str]:
    """Where -> text: the markdown, the Serve / cluster / Helm values files whole (their keys are examples an
    operator copies), NOTES.txt, and the --help texts."""
    docs = {_rel(p): p.read_text() for p in MARKDOWN + COMMENTED}
    docs["elasticmoe --help"] = _help_texts()
    return docs


def _found(pattern: str, chart: bool = True) -> list[tuple[str, str]]:
    """(file:line, group 1) for each match in every document (but the chart's, unless `chart`)."""
    out = []
    for where, text in _documents().items():
        if not chart and where.startswith("helm/"):
            continue
        for m in re.finditer(pattern, text):
            out.append((f"{where}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1)))
    return out


@functools.cache
def _package_source() -> str:
    return "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))


def test_environment_variables_named_anywhere_are_read_by_the_package():
    """A variable the documents name is in elasticmoe/'s source (set by the chart or cluster files is not enough)."""
    named = _found(r"\b(ELASTICMOE_[A-Z0-9_]*[A-Z0-9])")
    assert len({n for _, n in named}) > 10
    assert [(w, n) for w, n in named if n not in _package_source()] == []


def test_environment_variables_the_package_reads_are_documented():
    read = set(re.findall(r"[\"'](ELASTICMOE_[A-Z0-9_]+)[\"']", _package_source()))
    assert {"ELASTICMOE_CACHE", "ELASTICMOE_EXPERT_HOST", "ELASTICMOE_TLS_CA"} <= read
    docs = "\n".join(_documents().values())
    undocumented = [v for v in sorted(read) if not re.search(re.escape(v) + ("" if v.endswith("_") else r"\b"), docs)]
    assert undocumented == []


def test_app_arg_paths_named_anywhere_are_fields():
    """`limits.x`, `autoscaling.x`, `direct_grpc.x`, `*_resources.x` in snake_case are AppArgs fields (camelCase ones
    are the chart's values, as is every such name in the chart's files); a range `min_shards..max_shards` names both."""
    named = _found(r"(?<![\w.$/-])((?:%s)\.[a-z_]+(?:\.\.[a-z_]+)?)(?![\w-])" % "|".join(APP_ARG_GROUPS), chart=False)
    assert len(named) > 15
    missing = []
    for where, name in named:
        group, rest = name.split(".", 1)
        for field in rest.split(".."):
            if _app_arg_model(f"{group}.{field}") is None:
                missing.append((where, f"{group}.{field}"))
    assert missing == []


def _app_arg_paths(model=None, prefix: str = "") -> list[str]:
    from elasticmoe.config import AppArgs

    model, out = model or AppArgs, []
    for name in model.model_fields:
        out.append(prefix + name)
        sub = _app_arg_model(prefix + name)
        if sub not in (None, True):
            out += _app_arg_paths(sub, prefix + name + ".")
    return out


def test_every_app_arg_is_documented():
    """Each AppArgs field is named somewhere an operator reads: its dotted path, or its own name as a key of a Serve
    config or an example (`max_num_seqs: 8` under `limits:`)."""
    docs = "\n".join(_documents().values())
    paths = _app_arg_paths()
    assert "limits.max_num_seqs" in paths and "direct_grpc.drain_s" in paths
    undocumented = [p for p in paths if not re.search(r"(?<![\w.])(%s|%s)\b" % (re.escape(p), re.escape(
        p.rsplit(".", 1)[-1])), docs)]
    assert undocumented == []


def _subcommands() -> dict:
    from elasticmoe.cli import build_parser

    return next(a for a in build_parser()._actions if a.dest == "cmd").choices


@functools.cache
def _benchmark_flags() -> dict[str, set[str]]:
    return {p.name: set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", p.read_text()))
            for p in (REPO / "benchmarks").glob("*.py")}


def test_flags_named_anywhere_exist():
    """A `--flag` is an `elasticmoe` subcommand's (on the subcommand the line or help text names, if it names one),
    a benchmark script's (the one the line names, if it names one), or another program's (OTHER_TOOLS_FLAGS)."""
    subs = _subcommands()
    cli = {f for s in subs.values() for f in s._option_string_actions}
    others = set().union(*OTHER_TOOLS_FLAGS.values())
    scripts = _benchmark_flags()
    checked, wrong = 0, []
    for where, text in _documents().items():
        for n, line in enumerate(text.splitlines(), 1):
            for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*)", line):
                flag, before = m.group(1), line[:m.start()]
                sub = re.findall(r"elasticmoe (%s)\b" % "|".join(map(re.escape, subs)), before)
                script = re.findall(r"(\w+\.py)\b", before)
                checked += 1
                if sub and not re.search(r"[;|&]|\bray |\bhelm |\bkubectl ", before.split(sub[-1], 1)[-1]):
                    ok = flag in subs[sub[-1]]._option_string_actions
                elif script and script[-1] in scripts:
                    ok = flag in scripts[script[-1]]
                else:
                    ok = flag in cli or flag in others or any(flag in f for f in scripts.values())
                if not ok:
                    wrong.append((f"{where}:{n}", flag))
    assert checked > 50
    assert wrong == []


@functools.cache
def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _templates() -> str:
    return "\n".join(p.read_text() for p in (CHART / "templates").iterdir())


def _template_uses(path: list[str]) -> bool:
    """A template reads the value: its own key (`.Values.a.b`, `$v.a.b`, `$a.b`, `"b"`), or a map above it that a
    template passes on whole (`toYaml`, `with ... toYaml .`, `range`)."""
    tpl = _templates()
    if re.search(r"(?:\.|\bdig \"|\blist [^}]*\")%s\b" % re.escape(path[-1]), tpl):
        return True
    for i in range(len(path) - 1, 0, -1):
        for line in tpl.splitlines():
            if re.search(r"\.%s\b" % re.escape(path[i - 1]), line) and re.search(r"\b(?:toYaml|with|range)\b", line):
                return True
    return False


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    out = []
    for key, value in node.items():
        out.append([*prefix, key])
        if isinstance(value, dict) and value:
            out += _leaves(value, (*prefix, key))
    return out


def test_every_helm_value_is_read_by_a_template():
    unused = [".".join(p) for p in _leaves(_values()) if not _template_uses(p)]
    assert unused == []


def test_helm_values_named_anywhere_exist():
    """A camelCase value path (`gateway.directGrpc.port`, `autoscaling.minShards`) named in any document, values
    file comment or help text is in values.yaml (or its schema, for optional keys); a free-form map's own keys
    (`head.annotations.<any>`) are the operator's. tests/test_doc_helm_claims.py covers the code spans of the
    documents with the rest of the value names."""
    from tests.test_doc_helm_claims import _values_has

    top = set(_values())
    named = [(w, t) for w, t in _found(r"(?<![\w.$/{-])([a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)+)\b")
             if t.split(".")[0] in top and any(c.isupper() for c in t)]
    assert len({t for _, t in named}) > 30
    assert [(w, t) for w, t in named if not _values_has(t.split("."))] == []


def _registered_metrics() -> dict[str, set[str]]:
    """name -> label keys of every metric the package creates (Ray's Counter / Gauge / Histogram in metrics/series.py,
    the gateway's own /metrics text in openai_extras.py); a histogram's series get _bucket, _sum and _count."""
    out: dict[str, set[str]] = {}
    for path in (PACKAGE / "metrics" / "series.py", PACKAGE / "gateway" / "openai_extras.py"):
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            first = call.args[0] if call.args else None
            if not (isinstance(first, ast.Constant) and str(first.value).startswith("elasticmoe_")):
                continue
            labels = out.setdefault(first.value, set())
            for arg in call.args[1:]:
                if isinstance(arg, ast.Tuple):
                    labels |= {e.value for e in arg.elts if isinstance(e, ast.Constant)}
                elif isinstance(arg, ast.Dict):
                    labels |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
            name = getattr(call.func, "id", getattr(call.func, "attr", ""))
            if name == "hist":  # exported only as its three series
                for suffix in ("_bucket", "_sum", "_count"):
                    out[first.value + suffix] = labels | {"le"}
                del out[first.value]
    return out


def test_metric_names_named_anywhere_are_registered():
    """`elasticmoe_x` / `ray_elasticmoe_x{label,...}` in the documents is a metric the package creates, with those
    labels."""
    metrics = _registered_metrics()
    assert {"elasticmoe_requests_total", "elasticmoe_ttft_seconds_bucket", "elasticmoe_shard_registered"} <= set(
        metrics)
    assert metrics["elasticmoe_expert_tokens_total"] == {"layer", "expert"}
    named = _found(r"\b((?:ray_)?elasticmoe_[a-z0-9_]+(?:\{[^}]*\})?)")
    assert len(named) > 5
    wrong = []
    for where, found in named:
        name, _, labels = found.removeprefix("ray_").partition("{")
        if name in NOT_METRICS:
            continue
        keys = {re.split(r"[=!~]", lab)[0].strip() for lab in labels.rstrip("}").split(",") if lab.strip()}
        if name not in metrics or not keys <= metrics[name]:
            wrong.append((where, found))
    assert wrong == []


def test_the_names_that_are_not_metrics_are_what_the_allow_list_says():
    assert "{elasticmoe_gateway: 1}" in (PACKAGE / "config.py").read_text()
    assert "elasticmoe_gateway" in (CHART / "templates" / "_workergroup.tpl").read_text()


def test_sampling_help_states_each_commands_own_defaults():
    """`generate` leaves unset fields to the server (the checkpoint's generation_config, else 16 tokens and
    temperature 1.0); `offline` fills its own (greedy, 32 tokens): each --help says which, with the number the
    command uses."""
    import inspect

    from elasticmoe import cli
    from elasticmoe.gateway.grpc_api import sampling_from_proto
    from elasticmoe.rpc import generation_pb2 as gen

    subs = _subcommands()
    server = sampling_from_proto(gen.SamplingParams())
    generate = {f: subs["generate"]._option_string_actions[f].help or "" for f in ("--temperature", "--max-tokens")}
    assert f"generation_config, else {server.temperature}" in generate["--temperature"]
    assert f"generation_config, else {server.max_tokens}" in generate["--max-tokens"]
    offline = {f: subs["offline"]._option_string_actions[f].help or "" for f in ("--temperature", "--max-tokens")}
    assert "OFFLINE_DEFAULTS" in inspect.getsource(cli.cmd_offline)
    for flag, key in (("--temperature", "temperature"), ("--max-tokens", "max_tokens")):
        assert "server" not in offline[flag] and f"default {cli.OFFLINE_DEFAULTS[key]:g}" in offline[flag], flag
