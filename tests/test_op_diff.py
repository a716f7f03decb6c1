"""`benchmarks/op_diff.py`: per-step op counts of plain `Trainer` and DoGraph from the profiler (a tiny run)."""

from __future__ import annotations

from conftest import load_benchmark


def _op_diff():
    return load_benchmark("op_diff")


def test_counts_are_per_step_and_attribute_the_engine_to_dograph(capsys):
    result = _op_diff().main(["--batch", "2", "--seq", "8", "--steps", "2", "--warmup", "1", "--top", "5"])
    plain, dograph = result["plain"]["ops"], result["dograph"]["ops"]
    # GPT-2 2x64: 4 linear layers per block and the output head run through the engine's recording
    # Function once per step each, forward and backward; the plain step never does.
    assert dograph["_DeferredLinear"][0] == 9 and dograph["_DeferredLinearBackward"][0] == 9
    assert "_DeferredLinear" not in plain
    assert sum(c for c, _, _ in dograph.values()) > sum(c for c, _, _ in plain.values())
    out = capsys.readouterr().out
    assert "| plain |" in out and "| dograph |" in out and "`_DeferredLinearBackward`" in out
