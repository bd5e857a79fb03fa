"""What the documentation tests read: the documents, their code spans, command lines and result tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CHART = REPO / "helm" / "elasticmoe"
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), CHART / "README.md",
            REPO / "benchmarks" / "KERNELS.md"]
COMMENTED = [*sorted((REPO / "deployments").glob("*.yaml")), *sorted((REPO / "cluster").glob("*.yaml")),
             *sorted(CHART.glob("values*.yaml")), CHART / "templates" / "NOTES.txt"]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _code(path: Path) -> list[tuple[str, str, bool]]:
    """(where, code, whole command lines?): a markdown file's fenced blocks and inline spans; a YAML file's
    comments (a commented command is a whole line)."""
    text = path.read_text()
    if path.suffix != ".md":
        return [(f"{_rel(path)}:{n}", line.split("#", 1)[1] if path.suffix == ".yaml" else line, True)
                for n, line in enumerate(text.splitlines(), 1) if "#" in line or path.suffix != ".yaml"]
    out = []
    for m in re.finditer(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        line_no = text.count("\n", 0, m.start()) + 2
        for n, line in enumerate(m.group(1).replace("\\\n", " ").splitlines()):
            out.append((f"{_rel(path)}:{line_no + n}", line, True))
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for n, line in enumerate(prose.splitlines(), 1):
        out += [(f"{_rel(path)}:{n}", span, False) for span in re.findall(r"`([^`\n]+)`", line)]
    return out


def _all_code() -> list[tuple[str, str, bool]]:
    return [c for path in MARKDOWN + COMMENTED for c in _code(path)]


def _app_arg_model(path: str):
    """The pydantic model at `path` in AppArgs (a dotted name), True for a leaf field, None if there is none."""
    from pydantic import BaseModel

    from elasticmoe.config import AppArgs

    model = AppArgs
    for part in path.split("."):
        if model is None or model is True or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        nested = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = nested[0] if nested else True
    return model


def _json(name: str) -> dict:
    """The committed result JSON benchmarks/results/`name`."""
    return json.loads((RESULTS / name).read_text())


def _table(doc: str, header: str, after: str = "") -> list[list[str]]:
    """The body rows (cells, `**` dropped) of the first markdown table whose header row starts with `header`,
    after the first occurrence of `after`."""
    text = (REPO / doc).read_text()
    start = text.index(after) if after else 0
    lines = text[start:].splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
    assert rows, f"{doc}: no rows under {header!r}"
    return rows


def _says(cell: str, *values: float) -> None:
    """Each number printed in `cell` is the matching value rounded to the printed digits."""
    printed = NUMBER.findall(cell)
    assert len(printed) == len(values), f"{cell!r}: {len(printed)} numbers, want {len(values)}"
    for text, value in zip(printed, values):
        digits = len(text.split(".")[1]) if "." in text else 0
        shown = float(text.replace(",", ""))
        assert abs(shown - value) <= 0.5 * 10 ** -digits + 1e-9, f"{cell!r}: {text} but the JSON says {value!r}"
