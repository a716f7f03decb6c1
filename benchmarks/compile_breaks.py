"""torch.compile graph breaks and step time: plain `Trainer` vs `DoGraphTrainer`, in the same run.

A tiny GPT-2 (built from a config, offline) trains for a few steps with `TrainingArguments(torch_compile=True)`,
once with `transformers.Trainer` and once with `hf_dograph.DoGraphTrainer` (factored engine), on the same
batches. A callback reads torch._dynamo's counters around every optimizer step:

* **graph breaks**: `counters["graph_break"]` (dynamo counts a break each time it traces a frame and has to
  split it; a cached frame that is simply re-run adds nothing, so a steady-state step that still adds breaks
  is re-tracing: a guard failed);
* **frames traced**: `counters["stats"]["unique_graphs"]` (graphs compiled in that step);
* **step time**: wall time of the step (median over the steps after the first `--warmup`; with `--repeats`
  the two runs alternate, order flipped each time, and the median over all of them is given: on a shared
  machine whose load drifts, only times measured close together are comparable).

    python benchmarks/compile_breaks.py                       # inductor, as torch_compile=True uses
    python benchmarks/compile_breaks.py --backend aot_eager   # same breaks, much faster to compile on CPU
    python benchmarks/compile_breaks.py --engine-level        # no Trainer: a compiled model + the engine

`--engine-level` measures the same thing without either trainer (a compiled model's forward, per-sample
losses and the engine's backward/accumulate, vs a plain compiled forward/backward), for when the trainer
cannot be used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _model(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.dim, n_layer=args.layers,
                     n_head=max(1, args.dim // 32), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _rows(args) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    n = args.batch * (args.steps + 1)
    ids = torch.randint(0, args.vocab, (n, args.seq), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist(), "attention_mask": [1] * args.seq} for r in ids]


def _collate(rows):
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def _counts():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


class _Meter:
    """Per-step graph breaks, traced graphs and wall time."""

    def __init__(self):
        self.breaks, self.graphs, self.times = [], [], []
        self._t = self._b = self._g = None

    def begin(self):
        self._b, self._g = _counts()
        self._t = time.perf_counter()

    def end(self):
        self.times.append(time.perf_counter() - self._t)
        b, g = _counts()
        self.breaks.append(b - self._b)
        self.graphs.append(g - self._g)


def _trainer_run(kind: str, args) -> _Meter:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    meter = _Meter()

    class Cb(TrainerCallback):
        def on_step_begin(self, *a, **k):
            meter.begin()

        def on_step_end(self, *a, **k):
            meter.end()

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                  report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no",
                  learning_rate=1e-3, seed=0, torch_compile=True, torch_compile_backend=args.backend,
                  dataloader_num_workers=0, remove_unused_columns=False)
    torch._dynamo.reset()
    data = Dataset.from_list(_rows(args))
    if kind == "plain":
        trainer = Trainer(model=_model(args), args=TrainingArguments(**common), train_dataset=data,
                          data_collator=_collate, callbacks=[Cb()])
    else:
        from hf_dograph import DoGraphConfig, DoGraphTrainer

        cfg = DoGraphConfig(**common, grad_engine="factored", num_domains=3, projection_dim=256)
        trainer = DoGraphTrainer(model=_model(args), args=cfg, train_dataset=data, data_collator=_collate,
                                 callbacks=[Cb()])
    trainer.train()
    return meter


def _engine_run(kind: str, args) -> _Meter:
    """No trainer: torch.compile(model) forward + per-sample losses + (engine backward/accumulate | backward)."""
    import torch

    from hf_dograph.losses import causal_lm_per_sample_loss
    from hf_dograph.sketch.factored import FactoredEngine

    torch._dynamo.reset()
    model = _model(args)
    model.train()
    compiled = torch.compile(model, backend=args.backend)
    rows = _rows(args)
    eng = FactoredEngine(model, projection_dim=256, seed=0) if kind != "plain" else None
    meter = _Meter()
    for step in range(args.steps):
        batch = _collate(rows[step * args.batch:(step + 1) * args.batch])
        b, t = batch["input_ids"].shape
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=torch.arange(t).expand(b, t))
        meter.begin()
        model.zero_grad(set_to_none=True)
        if eng is None:
            losses = causal_lm_per_sample_loss(compiled(**inputs).logits, batch["labels"])[0]
            losses.mean().backward()
        else:
            with eng.capturing():
                losses = causal_lm_per_sample_loss(compiled(**inputs).logits, batch["labels"])[0]
                eng.backward(losses)
            eng.sketches()
            eng.accumulate_weighted_gradient(torch.full((b,), 1.0 / b, dtype=torch.float64))
            eng.clear()
        meter.end()
    return meter


def _reasons(top: int) -> list[tuple[str, int]]:
    from torch._dynamo.utils import counters

    return counters["graph_break"].most_common(top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state figures")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--engine-level", action="store_true", help="compiled model + engine, no Trainer")
    p.add_argument("--reasons", type=int, default=8, help="most frequent break reasons to print per run")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times (timing)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = _engine_run if args.engine_level else _trainer_run
    label = {"plain": "plain (compiled)", "dograph": "DoGraph factored (compiled)"}
    meters: dict[str, list[_Meter]] = {"plain": [], "dograph": []}
    for r in range(args.repeats):
        for kind in (("plain", "dograph") if r % 2 == 0 else ("dograph", "plain")):
            from torch._dynamo.utils import counters

            counters.clear()
            m = run(kind, args)
            meters[kind].append(m)
            print(f"\n[{label[kind]}] per-step graph breaks: {m.breaks}; graphs traced: {m.graphs}; "
                  f"step times: {[round(t, 4) for t in m.times]}", file=sys.stderr)
            for reason, n in _reasons(args.reasons):
                print(f"  {n:4d} × {reason[:160]!s}", file=sys.stderr)
    steady = slice(args.warmup, None)
    rows = []
    for kind in ("plain", "dograph"):
        ms = meters[kind]
        rows.append((label[kind], ms[0].breaks[0], statistics.mean(b for m in ms for b in m.breaks[steady]),
                     ms[0].graphs[0], statistics.mean(g for m in ms for g in m.graphs[steady]),
                     statistics.median(m.times[0] for m in ms),
                     statistics.median(t for m in ms for t in m.times[steady])))
    print(f"\nGPT-2 {args.layers}x{args.dim}, vocab {args.vocab}, B={args.batch}, T={args.seq}, "
          f"backend={args.backend}, "
          f"{'engine level' if args.engine_level else 'Trainer level'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeat(s); steady state = steps "
          f"{args.warmup + 1}..{args.steps}")
    head = ("run", "breaks step 1", "breaks/step (steady)", "graphs step 1", "graphs/step (steady)",
            "step 1 s", "step s (median, steady)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
