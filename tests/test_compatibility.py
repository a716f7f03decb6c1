"""Drop-in means drop-in: the compatibility matrix of `compat_matrix.py`, and the README table it produces.

Each row trains 2 SGD steps with the plain `Trainer` and with `DoGraphTrainer` (`mixing_strategy="uniform"`,
`num_domains=1` on each engine): the parameters must equal the Trainer's to 1e-6 relative (bf16: 1e-4) and
the logged losses must be the Trainer's; DoGraph with three domains must move the weights. A combination
DoGraph refuses on purpose must be refused at construction with its reason.
"""

from __future__ import annotations

import re

import pytest

from compat_matrix import CASES, COLUMNS, REFUSED, render_table, run_case
from conftest import REPO_ROOT

_RESULTS: dict[str, dict] = {}


def _row(case):
    if case.name not in _RESULTS:
        _RESULTS[case.name] = run_case(case)
    return _RESULTS[case.name]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matrix_row(case):
    row = _row(case)
    assert list(row) == COLUMNS
    failures = {col: detail for col, (ok, detail) in row.items() if ok is False}
    assert not failures, failures
    for col, (ok, detail) in row.items():
        if ok == "refused":  # only where the matrix says so, and with the stated reason
            engine = "factored" if col in ("uniform", "3 domains") else col.split("(")[1].rstrip(")")
            assert (case.name, engine) in REFUSED and REFUSED[(case.name, engine)] in detail


def test_readme_table_is_what_the_matrix_produces():
    """The README's table is `render_table` of this very matrix (regenerate: python tests/compat_matrix.py)."""
    for case in CASES:
        _row(case)
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- compatibility-table:start -->\n(.*?)\n<!-- compatibility-table:end -->", readme, re.S)
    assert match, "README.md has no compatibility table between its markers"
    assert match.group(1).strip() == render_table(_RESULTS).strip()
