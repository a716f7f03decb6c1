"""DDP on CPU (gloo) through torchrun: two processes with B/2 each equal one process with B (persistent domains,
per-batch domains, a baseline; with accumulation and an uneven last batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_dograph.sketch import ENGINES

from ddp_worker import run_name

WORKER = Path(__file__).with_name("ddp_worker.py")
CONFIGS = [
    {"engine": e, "accumulation": ga, "uneven": uneven}
    for e in ("opacus", "factored") if e in ENGINES
    for ga, uneven in ((1, False), (2, False), (1, True))
] + [
    # The paper's per-batch domains (K-means on the gathered micro-batch) on both engines.
    {"engine": e, "accumulation": 2, "uneven": True, "mode": "per_batch"} for e in ("opacus", "factored") if e in ENGINES
] + [
    # A baseline (loss-only step, no per-sample gradients): the same hand-made reduction must hold.
    {"engine": "factored", "accumulation": 2, "uneven": True, "strategy": "loss_reweighting"},
]


def launch(out: Path, nproc: int, spec: dict, timeout: int = 300, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), json.dumps(spec)]
    elif launcher == "accelerate":
        # --multi_gpu selects DDP; without GPUs accelerate runs it on CPU with gloo.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", str(WORKER), str(out), json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(out), json.dumps(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"ddp{nproc}")
        proc = launch(out, nproc, {"configs": CONFIGS})
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[nproc] = {p.stem: torch.load(p) for p in out.glob("*.pt")}
    return results


@pytest.mark.parametrize("cfg", CONFIGS, ids=run_name)
def test_two_processes_equal_one(runs, cfg):
    name = run_name(cfg)
    one, two = runs[1][name], runs[2][name]
    assert one["steps"] == two["steps"] == 3
    # Same domains and weights at every micro-batch (rank 0 records the global batch's weights).
    assert len(one["weights"]) == len(two["weights"])
    if cfg.get("strategy", "dograph") == "dograph":
        assert one["weights"], "the domains never acted: the test would not compare weights"
    for w1, w2 in zip(one["weights"], two["weights"]):
        assert torch.allclose(torch.tensor(w1), torch.tensor(w2), rtol=1e-5, atol=1e-7)
    for n, p in one["params"].items():
        q = two["params"][n]
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (n, float((p - q).abs().max()))


def test_accelerate_launch_equals_one_process(runs, tmp_path):
    cfg = {"engine": "opacus", "accumulation": 2, "uneven": False}
    proc = launch(tmp_path, 2, {"configs": [cfg]}, launcher="accelerate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "opacus_ga2_even.pt")
    one = runs[1]["opacus_ga2_even"]
    for n, p in one["params"].items():
        assert torch.allclose(p, two["params"][n], rtol=1e-5, atol=1e-6), n


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    spec = {"configs": [CONFIGS[0]], "fail_rank": 1}
    start = time.time()
    proc = launch(tmp_path, 2, spec, timeout=240)
    assert proc.returncode != 0
    assert "deliberate failure on rank 1" in proc.stderr
    assert time.time() - start < 180
