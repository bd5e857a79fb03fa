"""Regenerates (or, with --check, verifies) the committed gRPC/protobuf Python code from protos/."""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

# elasticmoe/rpc/generate.py -> the repository root holding protos/ and elasticmoe/.
REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_PACKAGE = Path("elasticmoe") / "rpc"  # both the protos' folder under protos/ and the output package
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """The .proto files under protos/elasticmoe/rpc/, sorted; raises FileNotFoundError if none."""
    protos = sorted((root / "protos" / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root / 'protos' / PROTO_PACKAGE}")
    return protos


def run_protoc(root: Path, out: Path) -> list[Path]:
    """Compiles root/protos/elasticmoe/rpc/*.proto into out/elasticmoe/rpc/; returns the files made.

    Imports in the generated code are rooted at out (`from elasticmoe.rpc import ..._pb2`).
    """
    from grpc_tools import protoc  # deferred: grpc_tools is a build-time dependency only

    protos = proto_files(root)
    include = root / "protos"
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{include}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", f"--pyi_out={out}", *(str(p) for p in protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(p.name for p in protos)}")
    return expected_outputs(root, out)


def expected_outputs(root: Path, out: Path) -> list[Path]:
    """The generated files the protos under root yield, placed under out."""
    return [out / PROTO_PACKAGE / (p.stem + suffix) for p in proto_files(root) for suffix in GENERATED_SUFFIXES]


def generated_in_tree(root: Path) -> list[Path]:
    """Generated-looking files present in root/elasticmoe/rpc/ (including orphans of deleted protos)."""
    pkg = root / PROTO_PACKAGE
    return sorted(p for p in pkg.iterdir() if p.is_file() and p.name.endswith(GENERATED_SUFFIXES))


def check(root: Path = REPO_ROOT) -> list[str]:
    """Regenerates into a temp dir and compares with root's; returns the stale files' problems."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="elasticmoe-protoc-") as tmp:
        fresh = run_protoc(root, Path(tmp))
        expected = set()
        for new in fresh:
            rel = new.relative_to(tmp)
            expected.add(rel)
            old = root / rel
            if not old.exists():
                problems.append(f"{rel}: missing")
            elif not filecmp.cmp(new, old, shallow=False):
                problems.append(f"{rel}: stale (differs from protoc output)")
    for path in generated_in_tree(root):
        if path.relative_to(root) not in expected:
            problems.append(f"{path.relative_to(root)}: orphan (no matching .proto)")
    return problems


def generate(root: Path = REPO_ROOT) -> list[Path]:
    """Regenerates the code in place (root/elasticmoe/rpc/); returns the files written."""
    return run_protoc(root, root)


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m elasticmoe.rpc.generate [--check] [--root DIR]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m elasticmoe.rpc.generate", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temp dir; exit 1 listing stale/missing/orphan files")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.check:
        problems = check(root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("generated code is out of date: run `python -m elasticmoe.rpc.generate`", file=sys.stderr)
            return 1
        print(f"generated code is up to date ({len(expected_outputs(root, root))} files)")
        return 0
    for path in generate(root):
        print(path.relative_to(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
