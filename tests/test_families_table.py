"""The README's table of supported families, generated from the families this suite checks: FAMILY_CASES
(tests/test_families.py), MORE_CASES (tests/test_families_more.py) and tests/test_model.py's TINY_FAMILIES.
`python tests/test_families_table.py` rewrites it; test_readme_table_is_generated_from_the_tests keeps them equal, and
the loader accepts exactly the tested `model_type`s."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run as a script (rewriting the table): tests.* importable
    sys.path.insert(0, str(REPO))

from tests.test_families import FAMILY_CASES, TINY_FEATURES  # noqa: E402


def families_table() -> str:
    """The README's markdown table of supported families, from the families this suite checks."""
    rows = [(t, TINY_FEATURES[t], "tests/test_model.py") for t in sorted(TINY_FEATURES)]
    rows += [(t, FAMILY_CASES[t][2], "tests/test_families.py") for t in sorted(FAMILY_CASES)]
    rows += [(t, c[2], "tests/test_families_more.py") for t, c in sorted(_more_cases().items())]
    lines = ["| `model_type` | what its test exercises | test |", "| --- | --- | --- |"]
    lines += [f"| `{t}` | {what} | `{test}` |" for t, what, test in sorted(rows)]
    return "\n".join(lines)


def _more_cases() -> dict[str, tuple]:
    from tests.test_families_more import MORE_CASES

    return MORE_CASES


BEGIN, END = "<!-- families:begin (python tests/test_families_table.py) -->", "<!-- families:end -->"


def test_supported_families_are_exactly_the_tested_ones():
    from elasticmoe.model.families import FAMILIES
    from elasticmoe.model.tiny import TINY_FAMILIES

    assert set(TINY_FEATURES) == set(TINY_FAMILIES)
    tested = set(FAMILY_CASES) | set(_more_cases()) | set(TINY_FAMILIES)
    # a multimodal case runs its language model's family (saved alone too: tests/test_families_multimodal.py)
    assert set(FAMILIES) == tested | {FAMILIES[t].text_model for t in tested if FAMILIES[t].text_model}


def test_readme_table_is_generated_from_the_tests():
    readme = (REPO / "README.md").read_text()
    assert BEGIN in readme and END in readme
    assert readme.split(BEGIN)[1].split(END)[0].strip() == families_table()


if __name__ == "__main__":  # rewrite the README's table
    text = (REPO / "README.md").read_text()
    if BEGIN not in text:
        sys.exit(f"README.md has no {BEGIN} marker")
    head, rest = text.split(BEGIN)
    (REPO / "README.md").write_text(f"{head}{BEGIN}\n{families_table()}\n{END}{rest.split(END)[1]}")
