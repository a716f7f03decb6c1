"""`benchmarks/sketch_floor.py`: the kernels it times compute what the engine computes (per-sample sketches and the
weighted gradient, both paths agreeing with a per-sample loop), and a tiny run and a replot produce their table
and figure."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO_ROOT, load_benchmark

STORED = REPO_ROOT / "benchmarks" / "figures" / "sketch_floor.json"


def _floor():
    return load_benchmark("sketch_floor")


def _close(x, y, rel=1e-5):
    return (x - y).abs().max().item() <= rel * max(1.0, y.abs().max().item())


BATCH, SEQ = 3, 8


def _kernels(dtype, fused=False):
    """The benchmark's kernels for a GPT-2 2x64 DoGraphTrainer's engine, BATCH samples of SEQ tokens."""
    floor = _floor()
    _, dograph = floor.plain_and_dograph({"model": "2x64", "batch": BATCH, "seq": SEQ, "device": "cpu"}, "floor_test")
    return floor.layer_kernels(dograph.grad_engine, BATCH, SEQ, dtype=dtype, fused=fused)


def _linear_loop(k):
    """A linear kernel's inputs laid out like its parameter (rows, cols), in float32, and each sample's weight
    gradient from a per-sample loop (the reference)."""
    a, d = k["a"].float(), k["d"].float()
    left, right = (a, d) if k["transposed"] else (d, a)
    return left, right, torch.stack([left[s].T @ right[s] for s in range(BATCH)])


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_every_variant_computes_the_engines_sketch_and_weighted_gradient(dtype, rel):
    kernels = _kernels(dtype)
    # GPT-2 2x64: wte and wpe, 4 linear maps per block, the output head (tied to wte)
    assert [k["kind"] for k in kernels].count("embedding") == 2 and [k["kind"] for k in kernels].count("linear") == 9
    for k in kernels:
        slot = k["slot"]
        coef, d = k["coef"], k["d"].float()  # the reference in float32, from the kernels' own (rounded) inputs
        assert k["d"].dtype == dtype
        if k["kind"] == "linear":
            per_sample = _linear_loop(k)[2]
        else:
            rows, dim = k["shape"]
            per_sample = torch.stack([torch.nn.functional.one_hot(k["ids"][s], rows).float().T @ d[s]
                                      for s in range(BATCH)])
        weighted_ref = sum(coef[s] * per_sample[s] for s in range(BATCH))
        sketch_ref = slot.sketch(per_sample)
        assert _close(k["plain"]().float(), per_sample.sum(0), rel), k["name"]
        variants = ("formed", "token") if k["kind"] == "linear" else ("embedding",)
        for v in variants:
            sketches, weighted = k[v]()
            assert sketches.dtype == torch.float32, (k["name"], v)  # sketches are float32, as in the engine
            assert _close(weighted.float(), weighted_ref, rel), (k["name"], v)
            assert _close(sketches, sketch_ref, max(rel, 1e-4)), (k["name"], v)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_kernels_compute_the_layer_and_the_engines_projections(dtype, rel):
    """`--fused`: the wider matmuls give the layer's own y = a W and dX = δ Wᵀ and the engine's token projections,
    the same as the separate products; laid out like the parameter, those projections make the engine's sketch of
    each sample's gradient (from a per-sample loop)."""
    kernels = [k for k in _kernels(dtype, fused=True) if k["kind"] == "linear"]
    projected = 0
    for k in kernels:
        slot = k["slot"]
        a, d = k["a"].float(), k["d"].float()
        a2, d2 = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
        left, right, per_sample = _linear_loop(k)
        y, dx = k["layer"]()
        u, v = k["projections"]()
        y_f, u_f, dx_f, v_f = k["layer_fused"]()
        assert _close(y_f.float(), y.float(), rel) and _close(dx_f.float(), dx.float(), rel), k["name"]
        for got, fused, source in ((u, u_f, a2), (v, v_f, d2)):
            if got is None:  # a side the slot keeps exact: nothing projected, nothing appended
                assert fused.shape[1] == 0, k["name"]
            else:
                projected += 1
                assert _close(fused.float(), got.float(), rel), k["name"]
        for pa, pd in ((u, v), (u_f, v_f)):
            pa = a2 if pa is None or pa.shape[1] == 0 else pa.float()
            pd = d2 if pd is None or pd.shape[1] == 0 else pd.float()
            p_left, p_right = (pa, pd) if k["transposed"] else (pd, pa)
            # the engine's projections of the same tokens: axis 0 of the rows side, axis 1 of the columns side
            assert _close(p_left, slot.project(left.reshape(-1, left.shape[-1]), 0), rel), k["name"]
            assert _close(p_right, slot.project(right.reshape(-1, right.shape[-1]), 1), rel), k["name"]
            sketches = torch.bmm(p_left.view(BATCH, SEQ, -1).transpose(1, 2), p_right.view(BATCH, SEQ, -1))
            assert _close(sketches, slot.sketch(per_sample), max(rel, 1e-4)), k["name"]
    assert projected >= 2 * len(kernels) - 2  # every side of every linear map but the head's exact hidden axis


def test_a_tiny_run_reports_a_finite_floor_and_replots(tmp_path, capsys):
    floor = _floor()
    r = floor.run_point("2x64", 2, 8, rounds=2, reps=1, log=lambda s: None, fused=True)
    assert r["plain_step_ms"] > 0 and r["dograph_step_ms"] > 0 and len(r["layers"]) == 11
    token = [x for x in r["layers"] if x["engine_path"] == "token"]
    assert r["fused"]["token_layers"] == len(token) > 0  # T = 8: short samples, every linear map on the token path
    assert r["fused"]["saving_ms"] == pytest.approx(sum(x["fused_saving_ms"] for x in token))
    assert all(math.isfinite(x["fused_saving_ms"]) for x in token)
    assert "| 2x64 | 2 | 8 | 9 |" in floor.fused_table([r]) and "saved by fusing" in floor.layer_table(r)
    for key in ("plain_weight_grads_ms", "floor_engine_ms", "floor_best_ms"):
        assert math.isfinite(r[key])
    assert r["floor_best_ms"] <= r["floor_engine_ms"] + 1e-9  # best-of-two per layer is never above the choice
    assert "| 2x64 | 2 | 8 |" in floor.table([r]) and "left of the 10% budget" in floor.table([r])
    budget = float(floor.table([r], bound=0.05).splitlines()[-1].split("|")[-2])  # the GPU goal's 5%
    assert "left of the 5% budget" in floor.table([r], bound=0.05)
    assert budget == pytest.approx(0.05 * r["plain_step_ms"] - r["floor_engine_ms"], abs=0.06)
    out = tmp_path / "floor.png"
    floor.main(["--replot", str(STORED), "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "| 2x64 | 16 | 128 |" in capsys.readouterr().out


def test_unknown_models_and_missing_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        _floor().main(["--models", "3x99"])
    assert "'3x99' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _floor().main(["--models", "12x64"])  # a model outside the grid needs its sizes
    assert "give --batch and --seq" in capsys.readouterr().err
