"""Where a DoGraph step spends its time, phase by phase, next to a plain `Trainer` step on the same batches.

Phases of `DoGraphTrainer.training_step` (timed by wrapping the methods that do each one; on CUDA with a
synchronization around each, so that the time lands in the phase that queued the work):

  forward            the model's forward and the per-sample split of the Trainer's loss
  backward           autograd's backward (input gradients; weight gradients deferred; narrow layers form
                     their per-sample gradients G here, with the dW's flops)
  sketch             the per-sample sketches from the kept activations and output gradients (or from G)
  weights            each sample's domain and weight (nearest centroid, lookup)
  weighted gradient  dW = δᵀ(α ⊙ a) per layer (Σ α G where G was formed) and the small parameters' Σ α g
  domain update      end of the optimizer step: the window, refits (amortized), statistics, weights
  optimizer          clipping, optimizer and scheduler step, zero_grad (as the Trainer does)
  other              what remains of the step (logging bookkeeping, ...)

    python benchmarks/step_profile.py                       # tiny default (2x64) and 4x256, 60 steps each
    python benchmarks/step_profile.py --models 2x64 --steps 40 --json out.json
    python benchmarks/step_profile.py --models 12x64 --steps 200   # host work by phase (GPT-2 small's graph)

Steps are measured after DoGraph's warm-up (domains fitted at the first step) and cover whole refit periods,
so the refits' cost is included at its amortized rate. Plain and DoGraph steps alternate (order flipped each
round), on the same batches: ratios compare like with like on a machine whose load drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, lm_batches, model_for, prepare_for_steps, step_args  # noqa: E402

PHASES = ("forward", "backward", "sketch", "weights", "weighted gradient", "domain update", "optimizer", "other")


class PhaseTimer:
    """Accumulates wall time per phase; nested phases are subtracted from their parents."""

    def __init__(self, sync):
        self.sync = sync
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list] = []

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            self.sync()
            elapsed = time.perf_counter() - start
            _, inner = self._stack.pop()
            self.totals[name] += elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed

    def wrap(self, obj, method: str, name: str) -> None:
        original = getattr(obj, method)

        def timed(*a, **k):
            with self.phase(name):
                return original(*a, **k)

        setattr(obj, method, timed)


def kept_memory(engine) -> dict[str, dict[str, float]]:
    """MB of what the factored engine keeps between its backward and the weighted gradient, per layer kind:
    output gradients δ (autograd would have freed them layer by layer: DoGraph's extra memory), inputs a (saved
    by autograd for the plain backward anyway; kept a little longer), and per-sample gradients (B × numel): of
    small parameters, of the weights whose micro-batch formed them instead of keeping δ and a
    (`LinearHandler.forms_per_sample`), and LayerNorm's per-sample sums, taken in the backward."""
    out: dict[str, dict[str, float]] = {}
    seen: set[int] = set()

    def add(kind, what, t):
        if not hasattr(t, "untyped_storage") or t.untyped_storage().data_ptr() in seen:
            return
        seen.add(t.untyped_storage().data_ptr())
        row = out.setdefault(kind, {"output gradients δ": 0.0, "inputs a": 0.0, "calls": 0})
        row[what] = row.get(what, 0.0) + t.untyped_storage().nbytes() / 2**20

    for h in getattr(engine, "handlers", []):
        kind = getattr(h, "kind", "layer")
        if kind == "linear" and getattr(h, "out_features", 0) > 8 * getattr(h, "in_features", 1):
            kind = "linear (output head)"
        for rec in h.done_records():
            out.setdefault(kind, {"output gradients δ": 0.0, "inputs a": 0.0, "calls": 0})["calls"] += 1
            for key, t in rec.tensors.items():
                items = list(t.values()) if isinstance(t, dict) else t if isinstance(t, (list, tuple)) else [t]
                for x in items:
                    if x is None or not hasattr(x, "untyped_storage"):
                        continue
                    what = ("output gradients δ" if key.startswith("delta") else
                            "per-sample gradients" if key in ("per_sample", "bias", "sums") else "inputs a")
                    add(kind, what, x)
    exact = getattr(engine, "_exact", {}) or {}
    if exact:
        out["small parameters (exact per sample)"] = {
            "output gradients δ": 0.0, "inputs a": 0.0, "calls": len(exact),
            "per-sample gradients": sum(g.numel() * g.element_size() for g in exact.values()) / 2**20}
    return out


def instrument(trainer, timer: PhaseTimer) -> None:
    """Wrap the methods of one DoGraph trainer (and its engine and strategy) that make up each phase."""
    engine = trainer.grad_engine
    timer.wrap(trainer, "per_sample_terms", "forward")
    timer.wrap(engine, "backward", "backward")
    if hasattr(engine, "_sketch"):
        timer.wrap(engine, "_sketch", "sketch")  # called inside backward: subtracted from it
    timer.wrap(trainer.dograph_strategy, "weights", "weights")
    timer.wrap(engine, "accumulate_weighted_gradient", "weighted gradient")
    timer.wrap(trainer.dograph_strategy, "end_step", "domain update")


def run(spec: dict) -> dict:
    import copy

    import torch
    from transformers import Trainer, TrainingArguments

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    device = spec["device"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base = model_for(spec)
    batches = lm_batches(spec, spec["steps"] + 2)
    common = step_args("step_profile", spec["batch"], device, bf16=spec.get("bf16", False))
    plain = Trainer(model=copy.deepcopy(base), args=TrainingArguments(**common))
    dograph = DoGraphTrainer(model=copy.deepcopy(base), args=DoGraphConfig(
        **common, domain_warmup_samples=spec["batch"], projection_dim=spec["projection_dim"]))
    timers = {"plain": PhaseTimer(sync), "dograph": PhaseTimer(sync)}
    instrument(dograph, timers["dograph"])
    memory = {}
    engine = dograph.grad_engine
    accumulate = engine.accumulate_weighted_gradient

    def measured(*a, **k):  # what the engine holds at its fullest: after the backward, before dW is formed
        if not memory:
            memory.update(kept_memory(engine))
        return accumulate(*a, **k)

    engine.accumulate_weighted_gradient = measured
    prepare_for_steps((plain, dograph), spec["steps"] + 2)

    def step(name, t, b, timer, measure):
        sync()
        start = time.perf_counter()
        t.training_step(t.model, {k: v.to(t.args.device) for k, v in b.items()})
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.args.max_grad_norm)
            t.optimizer.step()
            t.lr_scheduler.step()
            t.model.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    walls = {"plain": [], "dograph": []}
    for r, b in enumerate(batches):
        measure = r >= 2  # step 0: warm-up (domains fitted at its end), step 1: first weighted step, allocations
        if not measure:
            for name, t in (("plain", plain), ("dograph", dograph)):
                step(name, t, b, PhaseTimer(sync), False)
            if r == 1:  # the wrapped methods timed the two unmeasured steps too: start from zero
                timers["dograph"].totals = dict.fromkeys(PHASES, 0.0)
            continue
        order = (("plain", plain), ("dograph", dograph)) if r % 2 == 0 else (("dograph", dograph), ("plain", plain))
        for name, t in order:
            walls[name].append(step(name, t, b, timers[name], True))
    n = len(walls["plain"])
    out = {"spec": spec, "steps": n, "refits": dograph.dograph_strategy.model.refits, "kept_memory_mb": memory,
           "plain_step_s": sum(walls["plain"]) / n, "dograph_step_s": sum(walls["dograph"]) / n,
           "ratio_total": sum(walls["dograph"]) / sum(walls["plain"]),
           "ratio_median": statistics.median(d / p for d, p in zip(walls["dograph"], walls["plain"])),
           "phases": {}}
    for name in ("plain", "dograph"):
        totals = timers[name].totals
        totals["other"] = sum(walls[name]) - sum(v for k, v in totals.items() if k != "other")
        out["phases"][name] = {k: v / n for k, v in totals.items()}
    # the plain step: its training_step is forward + backward (not split further)
    plain_phases = out["phases"]["plain"]
    plain_phases["forward + backward"] = plain_phases.pop("other")
    return out


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        s = r["spec"]
        lines += [f"#### GPT-2 {s['model']}, B = {s['batch']}, T = {s['seq']}, V = {MODELS[s['model']][2]} "
                  f"({s['device']}; {r['steps']} steps, {r['refits']} refits)", "",
                  "| phase | plain Trainer (ms) | DoGraph (ms) | share of DoGraph's step |", "|---|---|---|---|"]
        d, p = r["phases"]["dograph"], r["phases"]["plain"]
        total = r["dograph_step_s"]
        for ph in PHASES:
            pv = p.get(ph) or None  # the plain step has no DoGraph phases, and its forward/backward are one
            pcell = f"{1000 * pv:.2f}" if pv is not None else ("(in forward + backward)" if ph in
                                                               ("forward", "backward") else "—")
            lines.append(f"| {ph} | {pcell} | {1000 * d[ph]:.2f} | {100 * d[ph] / total:.0f}% |")
        lines.append(f"| forward + backward (plain) | {1000 * p['forward + backward']:.2f} | | |")
        lines.append(f"| **step** | **{1000 * r['plain_step_s']:.2f}** | **{1000 * total:.2f}** | "
                     f"**{r['ratio_total']:.2f}× plain** (median per step {r['ratio_median']:.2f}×) |")
        lines.append("")
        mem = r.get("kept_memory_mb") or {}
        if mem:
            lines += ["What the factored engine keeps from its backward to the weighted gradient (MB; δ is the extra: "
                      "autograd frees it layer by layer):", "",
                      "| layer kind | calls | output gradients δ | inputs a | per-sample gradients |", "|---|---|---|---|---|"]
            for kind, row in mem.items():
                lines.append(f"| {kind} | {row['calls']} | {row['output gradients δ']:.1f} | {row['inputs a']:.1f} | "
                             f"{row.get('per-sample gradients', 0.0):.1f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="2x64,4x256")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    defaults = {"2x64": (16, 128), "2x128": (32, 128), "4x256": (16, 256), "6x512": (8, 256), "12x768": (16, 512),
                "12x64": (2, 8)}  # GPT-2 small's graph at negligible arithmetic: the phases' host work
    results = []
    for name in a.models.split(","):
        batch, seq = defaults[name]
        spec = dict(model=name, batch=batch, seq=seq, steps=a.steps, device=a.device, threads=a.threads,
                    projection_dim=a.projection_dim, bf16=a.bf16)
        print(f"profiling {name} ...", file=sys.stderr)
        results.append(run(spec))
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
