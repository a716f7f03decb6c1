"""Per-rank memory of DoGraph under FSDP2 (issue: sharded training): 2 ranks vs 1 rank, CPU / gloo.

    python benchmarks/fsdp_memory.py [--layers 8] [--width 512] [--vocab 8192] [--steps 2] [--optim adamw]

launches the same DoGraph training (factored engine, persistent domains, AdamW fp32) once as one plain process
and once as two processes under `torchrun` with the model sharded by `fully_shard` (each block, the root), and
prints, per rank:

* **state**: bytes of the parameters, gradients and optimizer state this rank holds (counted from the tensors
  themselves, each storage once: for DTensors the local shard);
* **staging peak**: the largest total of the full-size buffers the factored engine held at once while
  reduce-scattering the weighted gradient (its only FSDP-specific memory; measured by wrapping the buffers);
* **RSS**: resident memory after set-up and the peak during the steps (VmHWM, reset before the steps), in MiB.

Under FSDP2 the model is built on the meta device, sharded, then materialized (each rank allocates only its
shards), as a 3B model would have to be. `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model, optimizer) -> dict:
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            t = local(t)
            s = t.untyped_storage()
            if s.data_ptr() in seen or s.nbytes() == 0:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        return total

    params = [p for p in model.parameters()]
    out = {"parameters": size(params), "gradients": size([p.grad for p in params if p.grad is not None])}
    out["optimizer"] = size([v for st in optimizer.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0])
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"]
    return out


def build(args, sharded: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                     n_head=max(1, args.width // 64), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    if not sharded:
        return GPT2LMHeadModel(cfg)
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # values do not matter for memory; keep them small and finite
            local(p).normal_(0, 0.02)
    return model


def worker(args) -> None:
    from hf_dograph.config import DoGraphSettings
    from hf_dograph.distributed import all_reduce_gradients
    from hf_dograph.losses import causal_lm_per_sample_loss
    from hf_dograph.sketch import build_engine, fsdp as hfsdp
    from hf_dograph.weighting import MicroBatch, build_strategy

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    rss_start = rss_mib()
    model = build(args, sharded=world > 1)
    settings = DoGraphSettings(num_domains=4, projection_dim=256, domain_warmup_samples=4, domain_window=64)
    engine = build_engine("factored", model, projection_dim=settings.projection_dim, seed=0)
    strategy = build_strategy(settings)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-4) if args.optim == "adamw"
                 else torch.optim.SGD(model.parameters(), lr=1e-3))

    # Track the engine's full-size staging buffers (FSDP only).
    live, peak = {"now": 0}, {"max": 0}
    orig_buffer, orig_add, orig_flush = (hfsdp.ShardedGradients.buffer, hfsdp.ShardedGradients.add,
                                         hfsdp.ShardedGradients.flush)

    def note(self):
        live["now"] = sum(b.numel() * b.element_size() for b in self.buffers.values())
        peak["max"] = max(peak["max"], live["now"])

    def buffer(self, p):
        out = orig_buffer(self, p)
        note(self)
        return out

    def add(self, p, c):
        orig_add(self, p, c)
        note(self)

    hfsdp.ShardedGradients.buffer, hfsdp.ShardedGradients.add = buffer, add

    per_rank = args.batch // world
    gen = torch.Generator().manual_seed(0)
    rss_setup = rss_mib()
    reset_peak_rss()
    times = []
    for step in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)[rank * per_rank:(rank + 1) * per_rank]
        start = time.perf_counter()
        with engine.capturing():
            pos = torch.arange(args.seq).expand(per_rank, args.seq)
            logits = model(input_ids=ids, position_ids=pos).logits
            losses, counts = causal_lm_per_sample_loss(logits, ids)
            del logits
            engine.backward(losses)
        kept = engine.finite_samples() & (counts > 0)
        decision = strategy.weights(MicroBatch(losses=losses.detach(), items=counts, kept=kept,
                                               sketches=engine.sketches()))
        engine.accumulate_weighted_gradient(decision.multipliers / args.batch)
        engine.clear()
        all_reduce_gradients([p for _, p in engine.params])
        strategy.end_step()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if step < args.steps - 1:
            optimizer.zero_grad(set_to_none=False)  # keep gradients allocated: count them at the end
    state = state_bytes(model, optimizer)
    result = {"world": world, "rank": rank, "state": state, "staging_peak": peak["max"],
              "rss_start_mib": rss_start, "rss_setup_mib": rss_setup, "rss_peak_steps_mib": rss_mib("VmHWM"),
              "step_s": times, "num_parameters": sum(p.numel() for p in model.parameters()),
              "largest_weight_bytes": max(p.numel() * p.element_size() for p in model.parameters())}
    hfsdp.ShardedGradients.buffer, hfsdp.ShardedGradients.add, hfsdp.ShardedGradients.flush = (
        orig_buffer, orig_add, orig_flush)
    results = [None] * world
    if world > 1:
        dist.all_gather_object(results, result)
        dist.barrier()
        dist.destroy_process_group()
    else:
        results = [result]
    if rank == 0:
        print("RESULT " + json.dumps(results))


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    flags = [f"--{k}={getattr(args, k)}" for k in ("layers", "width", "vocab", "seq", "batch", "steps", "optim")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = {}
    for nproc in (1, 2):
        cmd = [sys.executable, __file__, "--worker", *flags]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   __file__, "--worker", *flags]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(out.stderr[-4000:])
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
        runs[nproc] = json.loads(line[len("RESULT "):])
    one = runs[1][0]
    print(f"GPT-2 {args.layers}×{args.width}, vocab {args.vocab}: {one['num_parameters'] / 1e6:.1f} M parameters, "
          f"{args.optim}, B = {args.batch} × {args.seq} tokens, {args.steps} steps; MiB per rank")
    print("| run | rank | parameters | gradients | optimizer | **state** | staging peak | RSS set-up | RSS peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for nproc, rows in runs.items():
        for r in rows:
            s = r["state"]
            print(f"| {'1 process' if nproc == 1 else 'FSDP2, 2 ranks'} | {r['rank']} | {mib(s['parameters'])} | "
                  f"{mib(s['gradients'])} | {mib(s['optimizer'])} | **{mib(s['total'])}** | {mib(r['staging_peak'])} | "
                  f"{r['rss_setup_mib']:,.0f} | {r['rss_peak_steps_mib']:,.0f} |")
    ratio = max(r["state"]["total"] for r in runs[2]) / one["state"]["total"]
    print(f"state per rank, 2 ranks / 1 rank: {ratio:.3f} (ideal 0.5); largest weight: "
          f"{mib(one['largest_weight_bytes'])} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
