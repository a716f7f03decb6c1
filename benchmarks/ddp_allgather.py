"""All-gather cost of data-parallel DoGraph (issue 6): volume and time per step next to the step time.

Run with two processes (CPU, gloo):

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_allgather.py [--steps 12] [--batch 16] [--k 1024]

In the same launch it trains a small GPT-2 with plain `Trainer` (DDP) and with `DoGraphTrainer`, and times
every DoGraph collective (sketch/loss/label all-gathers, the hand all-reduce of the weighted gradient).
Rank 0 prints a table; ratios to the plain Trainer step are the figures to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import hf_dograph.distributed as hd
import hf_dograph.trainer as ht
from hf_dograph import DoGraphConfig, DoGraphTrainer

TIMES: dict[str, list[float]] = {"gather": [], "allreduce": []}
BYTES: list[int] = []


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES[name].append(time.perf_counter() - start)
        if name == "gather":
            t = args[0]
            BYTES.append(t.numel() * t.element_size() * dist.get_world_size())
        return out

    return wrapper


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def run(cls, args, data, extra):
    timer = StepTimer()
    trainer = cls(model=model(), args=args, train_dataset=data, callbacks=[timer],
                  data_collator=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]})
    trainer.train()
    return statistics.median(timer.times[2:])  # first steps warm up


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=16, help="per-process batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--engine", default="factored")
    a = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(0)
    n = a.steps * a.batch * world
    ids = torch.randint(0, 4096, (n, a.seq), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "domain": [i % 5 for i in range(n)]})
    common = dict(output_dir="/tmp/ddp_bench", per_device_train_batch_size=a.batch, max_steps=a.steps, report_to=[],
                  use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=10_000, seed=0)
    plain = run(Trainer, TrainingArguments(**common),
                Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}), {})
    hd.gather_rows = timed("gather", hd.gather_rows)
    hd.all_reduce_gradients = timed("allreduce", hd.all_reduce_gradients)
    ht.gather_rows, ht.all_reduce_gradients = hd.gather_rows, hd.all_reduce_gradients
    dograph = run(DoGraphTrainer, DoGraphConfig(**common, projection_dim=a.k, grad_engine=a.engine, num_domains=11),
                  data, {})
    if dist.get_rank() == 0:
        gathers_per_step = len(TIMES["gather"]) / a.steps
        gather_t = sum(TIMES["gather"][int(2 * gathers_per_step):]) / (a.steps - 2)
        allreduce_t = statistics.median(TIMES["allreduce"][2:])
        volume = sum(BYTES) / a.steps
        rows = [
            ("processes × per-process batch", f"{world} × {a.batch}"),
            ("sketch dim k / engine", f"{a.k} / {a.engine}"),
            ("plain Trainer DDP step (median)", f"{plain * 1e3:.1f} ms"),
            ("DoGraph DDP step (median)", f"{dograph * 1e3:.1f} ms ({dograph / plain:.2f}× plain)"),
            ("all-gather volume per step (all ranks' rows)", f"{volume / 1024:.1f} KiB"),
            ("all-gather time per step", f"{gather_t * 1e3:.2f} ms ({gather_t / dograph * 100:.2f}% of the step)"),
            ("hand all-reduce of gradients per step", f"{allreduce_t * 1e3:.1f} ms ({allreduce_t / dograph * 100:.1f}%)"),
        ]
        width = max(len(r[0]) for r in rows)
        print("\n| quantity | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
