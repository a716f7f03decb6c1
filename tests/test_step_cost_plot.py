"""`benchmarks/step_cost.py --replot`: the step-cost figure drawn again from a stored run, no training."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT, load_benchmark

STORED = REPO_ROOT / "benchmarks" / "figures" / "step_cost_grid.json"


def _step_cost():
    return load_benchmark("step_cost")


def test_replot_draws_the_stored_grid(tmp_path):
    out = tmp_path / "grid.png"
    _step_cost().main(["--replot", str(STORED), "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_replot_without_a_plot_path_is_refused(capsys):
    with pytest.raises(SystemExit):
        _step_cost().main(["--replot", str(STORED)])
    assert "--replot needs --plot PATH" in capsys.readouterr().err
