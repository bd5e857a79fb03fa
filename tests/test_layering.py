"""Imports go downward: app, cli -> gateway, experts, autoscaler -> engine -> model, rpc -> kernels, placement."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.moe_cases import REPO

# Units of the package (a subpackage or a top-level module), lowest layer first. A unit may import its own modules
# and units of lower layers; in the middle layers not a sibling (the gateway never imports experts/, and so on).
LAYERS: list[set[str]] = [
    {"kernels", "placement", "progress", "config", "metrics", "heap", "lazy"},
    {"model", "rpc"},
    {"engine"},
    {"gateway", "experts", "autoscaler", "client", "local_cluster"},
    {"app", "cli", "cli_demo", "status_view", "__init__", "__main__"},  # __main__: `python -m elasticmoe`
]
SIBLINGS_OK = {4}  # the top layer's units may use each other (cli renders with status_view)
LEAVES = {"kernels", "placement"}  # import nothing else from the package
ROOT_METADATA = {"__version__"}  # `from elasticmoe import __version__` is not a dependency on the engine


def _unit(path: Path, pkg: Path) -> str:
    rel = path.relative_to(pkg).with_suffix("").parts
    return rel[0]


def _imported_units(tree: ast.AST, pkg: Path, name: str) -> set[tuple[str, int]]:
    """(unit, line) for every import of the package in the module, lazy imports inside functions included."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == name:  # `from elasticmoe import x`: a submodule, or a name of the root package
                for a in node.names:
                    if a.name in ROOT_METADATA:
                        continue
                    sub = (pkg / a.name).is_dir() or (pkg / f"{a.name}.py").exists()
                    out.add((a.name if sub else "__init__", node.lineno))
                continue
            mods = [node.module]
        else:
            continue
        out |= {(m.split(".")[1] if "." in m else "__init__", node.lineno) for m in mods
                if m == name or m.startswith(name + ".")}
    return out


def violations(pkg: Path, layers: list[set[str]] = LAYERS) -> list[str]:
    """Every upward, sideways or leaf-breaking import in package directory `pkg`, as "file:line: why"."""
    rank = {u: i for i, units in enumerate(layers) for u in units}
    found = []
    for path in sorted(pkg.rglob("*.py")):
        src = _unit(path, pkg)
        if src not in rank:
            found.append(f"{path.relative_to(pkg.parent)}: unit {src!r} has no layer (add it to LAYERS)")
            continue
        for dst, line in sorted(_imported_units(ast.parse(path.read_text()), pkg, pkg.name)):
            where = f"{path.relative_to(pkg.parent)}:{line}"
            if dst == src:
                continue
            if src in LEAVES:
                found.append(f"{where}: {src} imports {dst} ({src} imports nothing else from the package)")
            elif dst not in rank:
                found.append(f"{where}: imports unknown unit {dst!r}")
            elif rank[dst] > rank[src] or (rank[dst] == rank[src] and rank[src] not in SIBLINGS_OK):
                found.append(f"{where}: {src} (layer {rank[src]}) imports {dst} (layer {rank[dst]})")
    return found


def test_the_package_imports_only_downward():
    assert violations(REPO / "elasticmoe") == []


def _module_names(folder: Path) -> set[str]:
    """The names its modules are imported by when the folder is on sys.path (as benchmarks/ is for its scripts)."""
    return {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {folder.name}


def foreign_imports(folder: Path, forbidden: set[str]) -> list[str]:
    """Every import, lazy ones included, in the .py files under `folder` of a top-level name in `forbidden`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [f"{path.relative_to(folder.parent)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in forbidden]
    return found


def test_no_benchmark_code_in_the_package_and_benchmarks_do_not_import_tests():
    """Neither `benchmarks.x` nor a script's own name (`from machine import ...`) in the package; no test module,
    by package or by bare name (`from moe_cases import ...`), in benchmarks/."""
    pkg, bench, tests = REPO / "elasticmoe", REPO / "benchmarks", REPO / "tests"
    assert [p for p in pkg.rglob("*.py") if p.stem.startswith("bench")] == []
    assert foreign_imports(pkg, _module_names(bench)) == []
    assert foreign_imports(bench, _module_names(tests)) == []


def test_the_benchmark_rule_finds_each_kind_of_breach(tmp_path):
    """The rule above can fail: a package module importing a benchmark both ways, a benchmark a test module both
    ways, lazily; stdlib and package imports beside them pass."""
    files = {"benchmarks/machine.py": "import os\n", "tests/moe_cases.py": "",
             "elasticmoe/a.py": "import json\ndef f():\n    from machine import cpu_model\n"
                                "    import benchmarks.machine\n",
             "benchmarks/b.py": "from elasticmoe import a\nfrom moe_cases import REPO\n"
                                "from tests.moe_cases import REPO\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert foreign_imports(tmp_path / "elasticmoe", _module_names(tmp_path / "benchmarks")) == [
        "elasticmoe/a.py:3 machine", "elasticmoe/a.py:4 benchmarks.machine"]
    assert foreign_imports(tmp_path / "benchmarks", _module_names(tmp_path / "tests")) == [
        "benchmarks/b.py:2 moe_cases", "benchmarks/b.py:3 tests.moe_cases"]


def test_the_checker_finds_each_kind_of_breach(tmp_path):
    """The rule above can fail: a synthetic package with one breach of each kind, and allowed imports beside them."""
    pkg = tmp_path / "elasticmoe"
    files = {
        "kernels/a.py": "from elasticmoe.progress import x\n",  # a leaf importing a lower-ranked unit: still a breach
        "model/b.py": "import elasticmoe.kernels.a\nfrom elasticmoe.gateway import y\n",  # ok, then upward
        "gateway/c.py": "def f():\n    from elasticmoe.experts import z\n",  # sideways, lazily
        "experts/d.py": "from elasticmoe import __version__, model\nfrom elasticmoe import LLM\n",  # ok, then the root
        "cli.py": "from elasticmoe import status_view\n",  # top-layer siblings: ok
        "status_view.py": "", "progress.py": "", "__init__.py": "", "kernels/__init__.py": "",
        "model/__init__.py": "", "gateway/__init__.py": "", "experts/__init__.py": "", "novel.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    got = violations(pkg)
    assert got == [
        "elasticmoe/experts/d.py:2: experts (layer 3) imports __init__ (layer 4)",
        "elasticmoe/gateway/c.py:2: gateway (layer 3) imports experts (layer 3)",
        "elasticmoe/kernels/a.py:1: kernels imports progress (kernels imports nothing else from the package)",
        "elasticmoe/model/b.py:2: model (layer 1) imports gateway (layer 3)",
        "elasticmoe/novel.py: unit 'novel' has no layer (add it to LAYERS)",
    ], got
