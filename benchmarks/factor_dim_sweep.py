"""Where DoGraph's extra step time comes from at small widths, and the factored engine's settings that act there.

The factored sketch of a linear layer costs ≈ 2·B·T·(in + out)·f flops (f = `factor_dim`, 32 by default), a
sizeable fraction of the layer's own flops at widths 64–128. If that arithmetic were the cost, a smaller f
would shrink the step. A narrow layer can instead form its per-sample gradients (same sketch, same weighted
gradient) when in·out ≤ `form_below` · T·(in + out); which threshold pays is measured too. For each model,
plain `Trainer` against

* `uniform`: `DoGraphTrainer` with `mixing_strategy="uniform"` (the Trainer's per-sample loss, no sketch,
  no domain model: the trainer's own overhead),
* `dograph f=F`: the default DoGraph, its factored engine built with `factor_dim=F`,
* `dograph form_below=C`: the default DoGraph, its factored engine built with `form_below=C` (0: never form),

each pair in the same process, alternating steps (order flipped each round) on the same batches, median of
the per-round ratios with quartiles. Settings as `step_cost.py` (GPT-2 from config, random tokens, AdamW,
fp32, warm-up of one batch so that every measured step is weighted).

    python benchmarks/factor_dim_sweep.py                      # 2x64 B=16 and 2x128 B=32, T = 128, f = 8, 16, 32
    python benchmarks/factor_dim_sweep.py --models 4x256 --batch-sizes 16 --seq 256 --rounds 20
    python benchmarks/factor_dim_sweep.py --factor-dims 32 --form-below 0,0.5,1   # the forming threshold
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import lm_batches, model_for, paired_rounds, prepare_for_steps, step_args  # noqa: E402


def variant_trainer(name: str, base, common: dict, batch: int, projection_dim: int):
    """A DoGraphTrainer for one row of the table ('uniform', 'dograph f=F' or 'dograph form_below=C')."""
    from hf_dograph import DoGraphConfig, DoGraphTrainer
    from hf_dograph.sketch.factored import FactoredEngine

    if name == "uniform":
        return DoGraphTrainer(model=copy.deepcopy(base), args=DoGraphConfig(**common, mixing_strategy="uniform"))
    setting, value = name.split(" ", 1)[1].split("=")
    engine_kw = {"factor_dim": int(value)} if setting == "f" else {"form_below": float(value)}
    t = DoGraphTrainer(model=copy.deepcopy(base), args=DoGraphConfig(
        **common, projection_dim=projection_dim, domain_warmup_samples=batch))
    # These are engine arguments, not training settings: build the engine the trainer would, with them.
    engine = FactoredEngine(t.model, projection_dim=projection_dim, seed=t.dograph_settings.projection_seed,
                            **engine_kw)
    engine.attach()
    t._engine = engine
    return t


def measure(model: str, batch: int, seq: int, variants: list[str], rounds: int, projection_dim: int) -> list[dict]:
    from transformers import Trainer, TrainingArguments

    spec = {"model": model, "batch": batch, "seq": seq, "device": "cpu"}
    base = model_for(spec)
    batches = lm_batches(spec, rounds + 1)
    common = step_args("factor_dim_sweep", batch, "cpu")
    rows = []
    for name in variants:
        trainers = {"plain": Trainer(model=copy.deepcopy(base), args=TrainingArguments(**common)),
                    name: variant_trainer(name, base, common, batch, projection_dim)}
        prepare_for_steps(trainers.values(), rounds + 1)
        wall, _ = paired_rounds(trainers, batches)
        ratios = [v / p for v, p in zip(wall[name][1:], wall["plain"][1:])]
        q = statistics.quantiles(ratios, n=4)
        rows.append({"model": model, "batch": batch, "seq": seq, "variant": name,
                     "plain_ms": 1e3 * statistics.median(wall["plain"][1:]),
                     "variant_ms": 1e3 * statistics.median(wall[name][1:]),
                     "ratio": statistics.median(ratios), "q1": q[0], "q3": q[2]})
        print(f"[{time.strftime('%H:%M:%S')}] {model} B={batch} {name}: × {rows[-1]['ratio']:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | B | T | trainer | plain step (ms) | its step (ms) | × plain: median (quartiles) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['variant']} | {r['plain_ms']:.1f} | "
                     f"{r['variant_ms']:.1f} | **{r['ratio']:.2f}** ({r['q1']:.2f}–{r['q3']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="2x64,2x128")
    ap.add_argument("--batch-sizes", default="16,32", help="one per model")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--factor-dims", default="8,16,32", help="f of each 'dograph f=F' variant ('' for none)")
    ap.add_argument("--form-below", default="", help="form_below of each 'dograph form_below=C' variant")
    ap.add_argument("--no-uniform", action="store_true", help="leave out the 'uniform' variant")
    ap.add_argument("--rounds", type=int, default=40, help="measured rounds per pair (after one warm-up round)")
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    models, sizes = a.models.split(","), [int(b) for b in a.batch_sizes.split(",")]
    if len(models) != len(sizes):
        ap.error(f"--models has {len(models)} entries and --batch-sizes {len(sizes)}: give one batch size per model")
    variants = ([] if a.no_uniform else ["uniform"]) + [f"dograph f={f}" for f in a.factor_dims.split(",") if f]
    variants += [f"dograph form_below={c}" for c in a.form_below.split(",") if c]
    start = time.time()
    rows = []
    for model, batch in zip(models, sizes):
        rows += measure(model, batch, a.seq, variants, a.rounds, a.projection_dim)
    print(f"\nCommand: python benchmarks/factor_dim_sweep.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{time.time() - start:.0f} s; load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
