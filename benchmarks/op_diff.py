"""Which torch ops a DoGraph step adds to a plain `Trainer` step: calls and time per op, side by side.

The same model (same init) and batches for both trainers; after warm-up (DoGraph's domains fitted at the
first step), `--steps` optimizer steps of each run under `torch.profiler`, plain first, then DoGraph. Per step
it prints the op calls, the ops' self time on the CPU (on a GPU: the host's dispatch and launch work) and,
on CUDA, the kernels' self time on the device and the number of kernel launches. Then the ops whose self time
grew most. On a GPU this says whether DoGraph's extra is kernel time or host work the device waits for
(a step is host-bound when its host time exceeds its device time).

    python benchmarks/op_diff.py                                     # 2x64, B = 16, T = 128, CPU
    python benchmarks/op_diff.py --model 2x128 --batch 32
    python benchmarks/op_diff.py --device cuda --model 12x768 --batch 16 --seq 512 --bf16   # GPT-2 small

Profiler times are inflated by the profiler itself (each op's record): compare the two columns, and take
step times from `step_cost.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, lm_batches, optimizer_step, plain_and_dograph, prepare_for_steps  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profile_steps(trainer, batches: list[dict], device: str) -> dict:
    """Per step, over `batches` (one optimizer step each): {'ops': {op: (calls, host self ms, device ms of its
    kernels)}, 'wall_ms', 'launches': kernel launches, 'kernels': (kernel count, their device ms)}."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    n = len(batches)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for batch in batches:
            optimizer_step(trainer, batch)
        sync()
        wall = time.perf_counter() - t0
    ops, launches, kernels, kernel_ms = {}, 0.0, 0.0, 0.0
    for e in prof.key_averages():
        device_ms = (getattr(e, "self_device_time_total", 0.0) or 0.0) / n / 1e3
        if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU:  # a kernel (or copy) on the device
            kernels += e.count / n
            kernel_ms += device_ms
        elif e.key in LAUNCHES:
            launches += e.count / n
        elif not e.key.startswith("cuda"):  # the CUDA runtime's other calls are not ops
            ops[e.key] = (e.count / n, e.self_cpu_time_total / n / 1e3, device_ms)
    return {"ops": ops, "wall_ms": wall / n * 1e3, "launches": launches, "kernels": (kernels, kernel_ms)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="2x64", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="profiled optimizer steps per trainer")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps per trainer first")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--top", type=int, default=25, help="rows of the per-op table")
    ap.add_argument("--json", help="also write the totals and every op's row to this JSON file")
    a = ap.parse_args(argv)

    spec = {"model": a.model, "batch": a.batch, "seq": a.seq, "device": a.device, "seed": 0, "bf16": a.bf16}
    plain, dograph = plain_and_dograph(spec, "op_diff")
    trainers = {"plain": plain, "dograph": dograph}
    batches = lm_batches(spec, a.warmup + a.steps)
    prepare_for_steps(trainers.values(), len(batches))
    result = {}
    for name, trainer in trainers.items():
        for batch in batches[:a.warmup]:
            optimizer_step(trainer, batch)
        result[name] = profile_steps(trainer, batches[a.warmup:], a.device)

    def totals(r):
        ops = r["ops"].values()
        return sum(c for c, _, _ in ops), sum(h for _, h, _ in ops), r["kernels"][1]

    cuda = a.device == "cuda"
    print(f"\nCommand: python benchmarks/op_diff.py --model {a.model} --batch {a.batch} --seq {a.seq} --steps {a.steps}"
          f" --warmup {a.warmup}{' --device cuda' if cuda else ''}{' --bf16' if a.bf16 else ''}\n")
    head = "| per step | op calls | ops' host self time (ms) |" + (" kernels' device time (ms) | kernel launches |" if cuda else "")
    print(head + " wall under the profiler (ms) |")
    print("|---|---:|---:|" + ("---:|---:|" if cuda else "") + "---:|")
    for name in ("plain", "dograph"):
        calls, host, dev = totals(result[name])
        extra = f" {dev:.2f} | {result[name]['launches']:.0f} |" if cuda else ""
        print(f"| {name} | {calls:.0f} | {host:.2f} |{extra} {result[name]['wall_ms']:.1f} |")

    plain, dog = result["plain"]["ops"], result["dograph"]["ops"]
    rows = []
    for key in set(plain) | set(dog):
        p, d = plain.get(key, (0, 0, 0)), dog.get(key, (0, 0, 0))
        rows.append((d[1] - p[1], d[2] - p[2], key, p, d))
    rows.sort(key=lambda r: -(r[1] if cuda else r[0]))
    print(f"\nOps whose self time grew most (DoGraph − plain, per step; {'device' if cuda else 'host'} time order):\n")
    print("| op | calls plain → DoGraph | host ms plain → DoGraph |" + (" device ms plain → DoGraph |" if cuda else ""))
    print("|---|---:|---:|" + ("---:|" if cuda else ""))
    def row(key, p, d):
        dev = f" {p[2]:.2f} → {d[2]:.2f} |" if cuda else ""
        print(f"| `{key[:60]}` | {p[0]:.1f} → {d[0]:.1f} | {p[1]:.2f} → {d[1]:.2f} |{dev}")

    for _, _, key, p, d in rows[:a.top]:
        row(key, p, d)
    shrunk = [r for r in rows[a.top:] if (r[1] if cuda else r[0]) < 0][-5:]  # what DoGraph moved or avoids
    if shrunk:
        print("| … the five that shrank most: | | |" + (" |" if cuda else ""))
        for _, _, key, p, d in shrunk:
            row(key, p, d)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), **result}, f)
    return result


if __name__ == "__main__":
    main()
