"""What a domain refit costs on the CPU: K-means with a fixed number of iterations (what a GPU runs) against the
CPU's early stop (`kmeans.lloyd`), on the same window, in the same run, and whether they agree.

A DoGraph run (GPT-2 from config, random tokens as in `step_cost.py`, default DoGraph settings: window 512,
k = 1024, m = 11, a refit every 20 optimizer steps, 30 Lloyd iterations per K-means run) trains for `--steps`
optimizer steps. At each refit the domain model is fitted twice from the same state: first with the fixed
iterations (the device's code path: no host read), then as the run itself does on the CPU (stopping once the
assignments repeat); both are timed and their centroids compared bit for bit. The run continues from the
second. The first row is the first fit (k-means++ seedings, 3 starts), the others warm-started refits.

    python benchmarks/refit_cost.py                          # 2x64, B = 16, 130 steps (6 refits + first fit)
    python benchmarks/refit_cost.py --model 4x256 --batch 16 --seq 256 --steps 70
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, lm_batches, model_for, prepare_for_steps, step_args  # noqa: E402

_STATE = ("centroids", "domain", "spread", "refits", "last_refit_step")


def _snapshot(dm) -> dict:
    return {name: (v.clone() if hasattr(v, "clone") else v) for name in _STATE for v in [getattr(dm, name)]}


def _restore(dm, state: dict) -> None:
    for name, value in state.items():
        setattr(dm, name, value.clone() if hasattr(value, "clone") else value)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="2x64", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=130)
    a = ap.parse_args(argv)

    import torch

    import hf_dograph.kmeans as km
    from hf_dograph import DoGraphConfig, DoGraphTrainer
    from hf_dograph.domain_model import PersistentDomains

    spec = {"model": a.model, "batch": a.batch, "seq": a.seq, "device": "cpu", "seed": 0}
    trainer = DoGraphTrainer(model=model_for(spec), args=DoGraphConfig(
        **step_args("refit_cost", a.batch, "cpu"), domain_warmup_samples=a.batch))
    prepare_for_steps([trainer], a.steps)

    rows: list[dict] = []
    real_refit = PersistentDomains._refit
    real_stops_early = km._stops_early

    def compared_refit(dm) -> None:
        before = _snapshot(dm)
        km._stops_early = lambda x, stop_early: False  # the device's path: every iteration, no host read
        try:
            t0 = time.perf_counter()
            real_refit(dm)
            fixed_s = time.perf_counter() - t0
        finally:
            km._stops_early = real_stops_early
        fixed = dm.centroids.clone()
        _restore(dm, before)
        t0 = time.perf_counter()
        real_refit(dm)  # what the run does on the CPU
        early_s = time.perf_counter() - t0
        rows.append({"step": dm.steps, "first_fit": before["centroids"] is None, "fixed_ms": fixed_s * 1e3,
                     "early_ms": early_s * 1e3, "identical": bool(torch.equal(fixed, dm.centroids))})
        kind = "first fit" if rows[-1]["first_fit"] else "refit"
        print(f"  step {dm.steps:4d} {kind:9s} fixed {fixed_s * 1e3:7.1f} ms  early {early_s * 1e3:6.1f} ms  "
              f"identical {rows[-1]['identical']}", flush=True)

    PersistentDomains._refit = compared_refit
    try:
        for batch in lm_batches(spec, a.steps):
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.model.zero_grad(set_to_none=True)
    finally:
        PersistentDomains._refit = real_refit

    print(f"\nCommand: python benchmarks/refit_cost.py --model {a.model} --batch {a.batch} --seq {a.seq} "
          f"--steps {a.steps}\n")
    print("| refit | step | fixed iterations (ms) | CPU early stop (ms) | × | identical |\n|---|---:|---:|---:|---:|---|")
    for r in rows:
        kind = "first fit" if r["first_fit"] else "warm-started"
        print(f"| {kind} | {r['step']} | {r['fixed_ms']:.1f} | {r['early_ms']:.1f} | "
              f"{r['early_ms'] / r['fixed_ms']:.2f} | {'yes' if r['identical'] else '**no**'} |")
    later = [r for r in rows if not r["first_fit"]]
    if later:
        print(f"\nwarm-started refits, median: fixed {statistics.median(r['fixed_ms'] for r in later):.1f} ms, "
              f"early {statistics.median(r['early_ms'] for r in later):.1f} ms "
              f"(every {trainer.dograph_settings.refit_steps} optimizer steps)")
    if not all(r["identical"] for r in rows):
        raise SystemExit("the early stop changed the centroids")
    return rows


if __name__ == "__main__":
    main()
