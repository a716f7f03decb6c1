"""The arithmetic floor of DoGraph's per-sample sketch: what the factored engine's own tensor math costs beyond the
plain step's weight gradients, with no Python, hooks or bookkeeping around it, next to plain `Trainer` and
DoGraph steps in the same run.

For every weight the engine sketches (linear maps, embeddings; read from a real `DoGraphTrainer`'s engine, with
its own `WeightSlot` projections and its own formed/token choice), on random tensors of the layer's true shapes:

  plain      the weight gradient the plain backward computes: dW = δᵀa (one matmul), or the embedding backward
  formed     G_s = Σ_t δ_t a_tᵀ for all samples (one batched matmul), its sketch P_r G P_cᵀ (`WeightSlot.sketch`)
             and the weighted sum Σ_s c_s G_s
  token      the projections a P_cᵀ and δ P_rᵀ, their per-sample product, and the weighted dW = δᵀ(c ⊙ a)
  embedding  a column of P_V per token, δ P_Dᵀ, their per-sample product, and the scaled `index_add_`

With `--fused`, each linear layer also times its own two other matmuls (y = a W, dX = δ Wᵀ), its two token
projections (a P_in, δ P_out) alone, and the same four products as two wider matmuls, the projections appended
to W as extra columns (a [W | P_in], δ [Wᵀ | P_out], W concatenated afresh as in every step): what computing the
projections inside the forward's and backward's own matmuls would save, summed over the layers on the token
path. (The engine does not do this; the measurement says whether it is worth doing.)

floor = Σ (DoGraph's path) − Σ plain: the least extra a step can cost with this sketch at these settings, on this
machine, for the weights alone (biases, norms, the CountSketch into k, the domain model and the weights are
left out, so the true floor is higher). "engine" takes each layer's path as the engine chooses it (`form_below`);
"best" the cheaper of the two per layer. The ratio floor / plain step says how much of the issue's budget (10% on
the CPU grid, 5% for GPT-2 small on a GPU: `--bound`) the sketch's own arithmetic uses before anything else runs.

    python benchmarks/sketch_floor.py                                  # the step-cost grid, 20 rounds each
    python benchmarks/sketch_floor.py --models 2x64 --rounds 30 --json f.json --plot f.png
    python benchmarks/sketch_floor.py --replot f.json --plot f.png     # the figure again, no runs
    python benchmarks/sketch_floor.py --device cuda --models 12x768 --batch 16 --seq 512 --bf16 --bound 0.05
    python benchmarks/sketch_floor.py --models 2x128,4x256 --fused --layers   # would fused projections help?

With `--bf16` the activations and output gradients are bf16 and every matmul runs in bf16, as under the
Trainer's autocast, while per-sample gradients, sketches and the formed path's weighted sum are float32, as
in the engine. On CUDA each kernel is timed between two synchronizations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import (  # noqa: E402
    GRID, MODELS, lm_batches, optimizer_step, paired_rounds, plain_and_dograph, prepare_for_steps,
)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _median_ms(fn, reps: int, device: str = "cpu") -> float:
    fn()  # warm (allocator, first-call dispatch)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layer_kernels(engine, batch: int, seq: int, device: str = "cpu", dtype=None, fused: bool = False) -> list[dict]:
    """For each handler that sketches a weight: its name, shape, the engine's path, its inputs (`a`/`d` or
    `ids`/`d`, per-sample coefficients `coef`), its `WeightSlot` (`slot`) and one closure per variant: `plain` →
    dW; `formed`, `token`, `embedding` → (per-sample sketches, Σ_s coef_s G_s) in the parameter's layout, made
    with the engine's own pieces (the slot's projections, `weighted_sum`, the layout's `scale_tokens`,
    `one_hot`). `dtype`: of the activations and output gradients (float32 by default; bf16 as under autocast).
    `fused`: linear layers also get `layer` → (a W, δ Wᵀ), `projections` → (a P_in, δ P_out) and `layer_fused` →
    the same four from two wider matmuls (module docstring); a side the slot keeps exact has no projection."""
    import torch

    from hf_dograph.sketch.layers.base import weighted_sum
    from hf_dograph.sketch.layers.embedding import EmbeddingHandler
    from hf_dograph.sketch.layers.linear import LinearHandler
    from hf_dograph.sketch.layout import SampleLayout
    from hf_dograph.tensors import one_hot

    dtype = dtype or torch.float32
    layout = SampleLayout.rows(batch)
    g = torch.Generator().manual_seed(0)
    coef = torch.rand(batch, generator=g).to(device)

    def randn(*shape):  # drawn on the CPU (the same numbers on every device), then moved
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = []
    for h in engine.handlers:
        if isinstance(h, LinearHandler) and h.weight is not None:
            slot = engine.slot(h.weight)
            a, d = randn(batch, seq, h.in_features), randn(batch, seq, h.out_features)
            left, right = (a, d) if h.transposed else (d, a)  # the parameter's layout (rows, cols)
            left2, right2 = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])

            def plain(left2=left2, right2=right2):
                return left2.T @ right2

            def formed(left=left, right=right, slot=slot):  # → (sketches, weighted gradient)
                per_sample = torch.bmm(left.transpose(1, 2), right).float()
                weighted = weighted_sum(per_sample.reshape(batch, -1), coef, None)
                return slot.sketch(per_sample), weighted.view(per_sample.shape[1:])

            def token(left=left, right=right, slot=slot):
                u, v = slot.project(left, 0).float(), slot.project(right, 1).float()
                # the coefficients scale the narrower side, as the engine does (the smaller temporary)
                if left.shape[-1] <= right.shape[-1]:
                    left = layout.scale_tokens(left, coef)
                else:
                    right = layout.scale_tokens(right, coef)
                weighted = left.reshape(-1, left.shape[-1]).T @ right.reshape(-1, right.shape[-1])
                return torch.bmm(u.transpose(1, 2), v), weighted

            engine_path = "formed" if h.forms_per_sample(seq) else "token"
            out.append({"name": h.name, "kind": "linear", "shape": list(h.weight.shape), "engine": engine_path,
                        "transposed": h.transposed, "a": a, "d": d, "coef": coef, "slot": slot,
                        "plain": plain, "formed": formed, "token": token})
            if fused:
                out[-1].update(_fused_kernels(slot, a, d, left, randn(h.in_features, h.out_features)))
        elif isinstance(h, EmbeddingHandler):
            slot = engine.slot(h.weight)
            ids = torch.randint(0, h.num, (batch, seq), generator=g).to(device)
            d = randn(batch, seq, h.dim)

            def plain(ids=ids, d=d, h=h):
                return torch.zeros(h.num, h.dim, device=device, dtype=d.dtype).index_add_(
                    0, ids.reshape(-1), d.reshape(-1, h.dim))

            def embedding(ids=ids, d=d, h=h, slot=slot):
                p_rows = slot.projection(0, ids.device, torch.float32)
                u = one_hot(ids, h.num, torch.float32) if p_rows is None else p_rows[ids]
                sketches = torch.bmm(u.transpose(1, 2), slot.project(d, 1).float())
                scaled = layout.scale_tokens(d, coef)
                return sketches, torch.zeros(h.num, h.dim, device=device, dtype=d.dtype).index_add_(
                    0, ids.reshape(-1), scaled.reshape(-1, h.dim))

            out.append({"name": h.name, "kind": "embedding", "shape": list(h.weight.shape), "engine": "embedding",
                        "ids": ids, "d": d, "coef": coef, "slot": slot, "plain": plain, "embedding": embedding})
    return out


def _fused_kernels(slot, a, d, left, w) -> dict:
    """A linear layer's forward and input-gradient matmuls with and without its token projections appended as
    extra columns. `w` (in, out) stands for the weight in the orientation y = a w; the projections are the slot's,
    `left` being whichever of a and d lies along the parameter's rows (the slot's axis 0, as `layer_kernels` and
    the engine's `collect` lay them out)."""
    import torch

    a2, d2 = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
    a_axis = 0 if left is a else 1
    p_in = slot.projection(a_axis, a.device, a.dtype)
    p_out = slot.projection(1 - a_axis, d.device, d.dtype)
    n_in, n_out = w.shape

    def layer():
        return a2 @ w, d2 @ w.T

    def projections():
        return (None if p_in is None else a2 @ p_in), (None if p_out is None else d2 @ p_out)

    def layer_fused():
        # The weight changes every step, so the wider matrices are concatenated every time (their cost counts).
        y_u = a2 @ w if p_in is None else a2 @ torch.cat([w, p_in], 1)
        x_v = d2 @ w.T if p_out is None else d2 @ torch.cat([w.T, p_out], 1)
        return y_u[:, :n_out], y_u[:, n_out:], x_v[:, :n_in], x_v[:, n_in:]

    return {"layer": layer, "projections": projections, "layer_fused": layer_fused}


def run_point(model: str, batch: int, seq: int, rounds: int, reps: int, log, device: str = "cpu",
              bf16: bool = False, fused: bool = False) -> dict:
    import torch

    spec = {"model": model, "batch": batch, "seq": seq, "device": device, "seed": 0, "bf16": bf16}
    plain_t, dograph_t = plain_and_dograph(spec, "floor")
    prepare_for_steps([plain_t, dograph_t], 1000)
    batches = lm_batches(spec, rounds + 3)
    for b in batches[:3]:  # warm-up: DoGraph fits its domains at the first step
        optimizer_step(plain_t, b)
        optimizer_step(dograph_t, b)
    kernels = layer_kernels(dograph_t.grad_engine, batch, seq, device, torch.bfloat16 if bf16 else None, fused)
    variants = ("plain", "formed", "token", "embedding", "layer", "projections", "layer_fused")
    per_layer = {k["name"]: {v: [] for v in variants if v in k} for k in kernels}

    def sample_kernels(r: int) -> None:  # one sample of every variant per round, between the steps they compare with
        with torch.no_grad():
            for k in kernels:
                for v in per_layer[k["name"]]:
                    per_layer[k["name"]][v].append(_median_ms(k[v], reps, device))
        if (r + 1) % max(1, rounds // 4) == 0:
            log(f"  {model}: round {r + 1}/{rounds}")

    steps, _ = paired_rounds({"plain": plain_t, "dograph": dograph_t}, batches[3:], device, sample_kernels)
    plain_ms = statistics.median(steps["plain"]) * 1e3
    dograph_ms = statistics.median(steps["dograph"]) * 1e3
    ratios = [d / p for p, d in zip(steps["plain"], steps["dograph"])]
    layers = []
    for k in kernels:
        med = {v: statistics.median(xs) for v, xs in per_layer[k["name"]].items()}
        if k["kind"] == "linear":
            engine_ms, best_ms = med[k["engine"]], min(med["formed"], med["token"])
        else:
            engine_ms = best_ms = med["embedding"]
        layers.append({"name": k["name"], "kind": k["kind"], "shape": k["shape"], "engine_path": k["engine"],
                       **{f"{v}_ms": x for v, x in med.items()}, "engine_ms": engine_ms, "best_ms": best_ms})
    plain_dw = sum(x["plain_ms"] for x in layers)
    floor_engine = sum(x["engine_ms"] for x in layers) - plain_dw
    floor_best = sum(x["best_ms"] for x in layers) - plain_dw
    result = {"model": model, "batch": batch, "seq": seq, "vocab": MODELS[model][2], "rounds": rounds,
              "device": device, "bf16": bf16, "threads": torch.get_num_threads(),
              "plain_step_ms": plain_ms, "dograph_step_ms": dograph_ms,
              "step_ratio_median": statistics.median(ratios), "step_ratio_range": [min(ratios), max(ratios)],
              "plain_weight_grads_ms": plain_dw, "floor_engine_ms": floor_engine, "floor_best_ms": floor_best,
              "layers": layers}
    if fused:
        token_layers = [x for x in layers if x["engine_path"] == "token"]
        for x in layers:
            if "layer_ms" in x:
                x["fused_saving_ms"] = x["layer_ms"] + x["projections_ms"] - x["layer_fused_ms"]
        result["fused"] = {"token_layers": len(token_layers),
                           "projections_ms": sum(x["projections_ms"] for x in token_layers),
                           "saving_ms": sum(x["fused_saving_ms"] for x in token_layers)}
    return result


def table(results: list[dict], bound: float = 0.10) -> str:
    head = ("| model | B | T | plain step (ms) | plain's dW (ms) | floor: engine's paths (ms) | floor: best path "
            f"(ms) | floor / plain step | DoGraph step / plain (median, range) | left of the {bound:.0%} budget (ms) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        budget = bound * r["plain_step_ms"] - r["floor_engine_ms"]
        lo, hi = r["step_ratio_range"]
        rows.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['plain_step_ms']:.1f} | "
                    f"{r['plain_weight_grads_ms']:.1f} | {r['floor_engine_ms']:.1f} | {r['floor_best_ms']:.1f} | "
                    f"{r['floor_engine_ms'] / r['plain_step_ms']:.1%} | {r['step_ratio_median']:.2f}× "
                    f"({lo:.2f}–{hi:.2f}) | {budget:.1f} |")
    return "\n".join([head, *rows])


def fused_table(results: list[dict]) -> str:
    """`--fused`: per point, the token projections' cost alone and what computing them inside the layers' own
    matmuls saves (negative: costs more), over the layers on the token path."""
    rows = ["| model | B | T | token-path layers | projections alone (ms) | saved by fusing them (ms) | saved / plain step |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "fused" in r:
            f = r["fused"]
            rows.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {f['token_layers']} | {f['projections_ms']:.2f} | "
                        f"{f['saving_ms']:.2f} | {f['saving_ms'] / r['plain_step_ms']:.1%} |")
    return "\n".join(rows)


def layer_table(r: dict) -> str:
    fused = "fused" in r
    head = "| layer | shape | engine's path | plain dW | formed | token | embedding |"
    rule = "|---|---|---|---:|---:|---:|---:|"
    if fused:
        head += " y = aW, dX = δWᵀ | projections | both fused | saved by fusing |"
        rule += "---:|---:|---:|---:|"
    lines = [f"{r['model']} B={r['batch']} T={r['seq']}: per layer (ms; medians)", head, rule]
    keys = ("plain_ms", "formed_ms", "token_ms", "embedding_ms")
    keys += ("layer_ms", "projections_ms", "layer_fused_ms", "fused_saving_ms") if fused else ()
    for x in r["layers"]:
        cells = " | ".join(f"{x[k]:.2f}" if k in x else "—" for k in keys)
        lines.append(f"| {x['name']} | {'×'.join(map(str, x['shape']))} | {x['engine_path']} | {cells} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, bound: float = 0.10) -> None:
    """One bar per grid point: DoGraph's measured extra over the plain step, split into the sketch's arithmetic
    floor (engine's paths) and the rest, as a share of the plain step, against the issue's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nB={r['batch']} T={r['seq']}" for r in results]
    floor = [100 * r["floor_engine_ms"] / r["plain_step_ms"] for r in results]
    total = [100 * (r["step_ratio_median"] - 1) for r in results]
    rest = [max(0.0, t - f) for t, f in zip(total, floor)]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    xs = range(len(results))
    ax.bar(xs, floor, color="tab:orange", label="sketch arithmetic alone (floor, engine's paths)")
    ax.bar(xs, rest, bottom=floor, color="tab:blue", alpha=0.6, label="everything else (measured step − floor)")
    ax.axhline(100 * bound, color="tab:red", ls="--", lw=1, label=f"issue's bound (+{bound:.0%})")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("extra over the plain step (% of plain step)")
    where = ", ".join(sorted({r.get("device", "cpu") + (" bf16" if r.get("bf16") else "") for r in results}))
    ax.set_title(f"DoGraph's per-step extra and the part its sketch's own matmuls take ({where})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(m for m, _, _ in GRID),
                    help="models to run (comma list); grid models take the grid's B and T unless --batch/--seq")
    ap.add_argument("--batch", type=int, help="batch size (required for a model outside the grid)")
    ap.add_argument("--seq", type=int, help="sequence length (required for a model outside the grid)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the steps, bf16 kernels (see above)")
    ap.add_argument("--rounds", type=int, default=20, help="paired plain/DoGraph rounds per point")
    ap.add_argument("--reps", type=int, default=5, help="repeats of each kernel per round (its median is kept)")
    ap.add_argument("--layers", action="store_true", help="also print the per-layer table of every point")
    ap.add_argument("--fused", action="store_true",
                    help="also time the token projections computed inside the layers' own matmuls (see above)")
    ap.add_argument("--bound", type=float, default=0.10,
                    help="the issue's bound on the extra, as a fraction of the plain step (0.10 CPU grid, 0.05 GPU)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the figure here (PNG)")
    ap.add_argument("--replot", help="draw --plot from this JSON, no runs")
    args = ap.parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())["results"]
    else:
        grid = {m: (b, t) for m, b, t in GRID}
        points = []
        for model in args.models.split(","):
            if model not in MODELS:
                ap.error(f"--models: {model!r} is not one of {sorted(MODELS)}")
            grid_batch, grid_seq = grid.get(model, (None, None))
            batch, seq = args.batch or grid_batch, args.seq or grid_seq
            if batch is None or seq is None:
                ap.error(f"--models {model}: not in the grid {sorted(grid)}, so give --batch and --seq")
            points.append((model, batch, seq))
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                ap.error("--device cuda: no CUDA device here")
        results = []
        for model, batch, seq in points:
            print(f"measuring {model} B={batch} T={seq} on {args.device}{' bf16' if args.bf16 else ''} ...",
                  file=sys.stderr, flush=True)
            results.append(run_point(model, batch, seq, args.rounds, args.reps,
                                     lambda s: print(s, file=sys.stderr, flush=True), args.device, args.bf16,
                                     args.fused))
        if args.json:
            Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    print(table(results, args.bound))
    if any("fused" in r for r in results):
        print()
        print(fused_table(results))
    if args.layers:
        for r in results:
            print()
            print(layer_table(r))
    if args.plot:
        plot(results, args.plot, args.bound)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
