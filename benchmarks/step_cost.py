"""Step time and peak memory: plain `Trainer` vs `DoGraphTrainer` with the opacus and factored engines.

Same model (same init), same batches for every trainer. For each (model, batch size):

* **peak memory**: each trainer runs `train()` for one step in a fresh subprocess, its optimizer state
  allocated beforehand, so that its peak (ru_maxrss on CPU, torch.cuda.max_memory_allocated on GPU) is
  its own and includes everything a steady-state step holds; `--memory-runs` such processes per trainer
  (3 by default, the trainers alternating), the median reported with the range;
* **step time**: plain `Trainer` and DoGraph-factored run in one subprocess, alternating steps (order
  flipped every round) after one warm-up step each; the ratio is the median over rounds of
  t(factored)/t(plain) — on a shared machine whose load drifts, only such paired ratios are comparable.
  CPU-time ratios (user + system of the process) are reported too.

Ratios are to plain `Trainer` at the same point, measured in the same run.

    python benchmarks/step_cost.py                 # the full grid (≈ 20 min on a busy 2-core CPU)
    python benchmarks/step_cost.py --quick         # 4x256 only, B = 8/16 (≈ 5 min)
    python benchmarks/step_cost.py --device cuda --models 12x768 --batch-sizes 16 --seq 512   # GPT-2 small
    python benchmarks/step_cost.py --grid --rounds 40 --json grid.json --plot step_cost.png   # + a figure
    python benchmarks/step_cost.py --replot grid.json --plot step_cost.png   # the figure again, no runs

The reference (opacus) engine generates a k × d Gaussian block by block every step (d = all trainable
parameters): on CPU that costs minutes per step at these sizes, so by default it runs only on the smaller
model at B = 8 and 16, for one measured step each (its per-step time is dominated by that projection, so
warm-up effects are negligible in comparison); `--opacus-models` / `--opacus-batch-sizes` change that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODELS = {  # name → (n_layer, n_embd, vocabulary)
    "2x64": (2, 64, 259),  # the embedded default's size (bytes)
    "2x128": (2, 128, 256),
    "4x256": (4, 256, 8192),
    "6x512": (6, 512, 8192),
    "12x768": (12, 768, 50257),  # GPT-2 small (124M)
    # GPT-2 small's graph (12 blocks, the same layers and ops per step) at negligible arithmetic: with B = 2,
    # T = 8 a step is its host work (Python, dispatch), what a GPU waits for when a step is host-bound.
    "12x64": (12, 64, 259),
}
# The grid of the project's issue on step cost: (model, batch, sequence length).
GRID = [("2x64", 16, 128), ("2x128", 32, 128), ("4x256", 16, 256), ("6x512", 8, 256)]


# ---------------------------------------------------------------------------------------------- worker
def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def token_batches(spec: dict, count: int) -> list:
    """`count` batches of random token ids, (B, seq) each, the same stream (seed 1) in every worker."""
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = MODELS[spec["model"]][2]
    return [torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g) for _ in range(count)]


def lm_batches(spec: dict, count: int) -> list[dict]:
    """`token_batches` as causal-LM training batches (labels = inputs, no padding)."""
    import torch

    return [{"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
            for ids in token_batches(spec, count)]


def step_args(name: str, batch: int, device: str, **overrides) -> dict:
    """TrainingArguments fields shared by the benchmarks that call `training_step` themselves (no saving, no
    logging, seed 0); `overrides` replace or add fields."""
    args = dict(output_dir=f"/tmp/{name}_{os.getpid()}", per_device_train_batch_size=batch, report_to=[],
                save_strategy="no", disable_tqdm=True, learning_rate=1e-4, seed=0, use_cpu=(device == "cpu"))
    args.update(overrides)
    return args


def plain_and_dograph(spec: dict, name: str, **dograph) -> tuple:
    """(plain `Trainer`, `DoGraphTrainer`) on two copies of the GPT-2 of `spec` (the same init), with `step_args`;
    DoGraph's domains are fitted after one batch, so that the measured steps weight their samples. `dograph`:
    more `DoGraphConfig` fields."""
    import copy

    from transformers import Trainer, TrainingArguments

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    base = model_for(spec)
    common = step_args(name, spec["batch"], spec["device"], bf16=spec.get("bf16", False))
    plain = Trainer(model=copy.deepcopy(base), args=TrainingArguments(**common))
    dograph = DoGraphTrainer(model=copy.deepcopy(base), args=DoGraphConfig(
        **common, domain_warmup_samples=spec["batch"], **dograph))
    return plain, dograph


def prepare_for_steps(trainers, num_training_steps: int) -> None:
    """What `Trainer.train()` sets up before its first step, for trainers stepped by hand: optimizer and scheduler,
    no gradient accumulation."""
    for t in trainers:
        t.create_optimizer_and_scheduler(num_training_steps=num_training_steps)
        t.current_gradient_accumulation_steps = 1


def model_for(spec: dict):
    """The GPT-2 of `spec` (weights from seed 0, dropout 0), built after applying its thread setting."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n_layer, n_embd, vocab = MODELS[spec["model"]]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=spec["seq"], n_embd=n_embd, n_layer=n_layer,
                     n_head=max(1, n_embd // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def run_point(spec: dict) -> dict:
    """One (model, batch, trainer) point, in this process. Returns times and memory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    device = spec["device"]
    batch = spec["batch"]
    steps = spec["warmup"] + spec["steps"]
    import torch.nn  # noqa: F401 - everything the step needs is loaded before the baseline is read
    libraries_mb = _rss_now_mb() if device == "cpu" else 0.0
    model = model_for(spec)
    ids = torch.cat(token_batches(spec, steps))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    times: list[float] = []
    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0, self.c0 = time.perf_counter(), _cpu_seconds()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(_cpu_seconds() - self.c0)

    common = dict(output_dir=f"/tmp/step_cost_{os.getpid()}", per_device_train_batch_size=batch, max_steps=steps,
                  report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, learning_rate=1e-4,
                  seed=0, use_cpu=(device == "cpu"), dataloader_num_workers=0, bf16=spec.get("bf16", False))
    kind = spec["trainer"]
    if kind == "plain":
        args = TrainingArguments(**common)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Timer()])
    else:
        # domains fitted after the first step: the measured steps are weighted ones
        args = DoGraphConfig(**common, grad_engine=kind, projection_dim=spec["projection_dim"],
                             domain_warmup_samples=batch)
        trainer = DoGraphTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Timer()])
    # Allocate the optimizer's state before measuring (a step with zero gradients: Adam leaves the weights
    # as they are), so that one measured step shows the steady-state peak, optimizer state included.
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_now_mb()
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    measured = times[spec["warmup"]:] or times
    measured_cpu = cpu_times[spec["warmup"]:] or cpu_times
    # Training memory: the peak beyond the libraries (weights, gradients, optimizer state, activations, and
    # DoGraph's kept activations / output gradients, sketches and domain model).
    out = dict(spec, times=times, cpu_times=cpu_times, step_s=statistics.median(measured),
               cpu_s=statistics.median(measured_cpu), peak_mb=peak, base_mb=base, step_peak_mb=peak - base,
               training_mb=peak - libraries_mb)
    if kind == "factored":
        out["engine"] = {k: v for k, v in trainer.grad_engine.describe().items() if k in
                         ("sketch_input_dim", "factor_dim", "projection_dim", "fallback_modules")}
    return out


def run_paired(spec: dict) -> dict:
    """Step time of plain `Trainer` and DoGraph-factored, alternating steps in one process.

    On a shared machine the load drifts by 2× within minutes; timing both trainers step by step, in
    alternating order, on the same batches, makes each round's ratio compare like with like. A step here is
    what `Trainer.train()` does per optimizer step: `training_step` (forward, backward; DoGraph's clustering
    and weighted gradient), gradient clipping, optimizer and scheduler step, zero_grad."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = spec["device"]
    rounds = spec["warmup"] + spec["steps"]
    batches = lm_batches(spec, rounds)
    plain, factored = plain_and_dograph(spec, "step_cost", grad_engine="factored",
                                        projection_dim=spec["projection_dim"])
    trainers = {"plain": plain, "factored": factored}
    prepare_for_steps(trainers.values(), rounds)

    wall, cpu = paired_rounds(trainers, batches, device)
    k = spec["warmup"]
    ratio = [f / p for f, p in zip(wall["factored"][k:], wall["plain"][k:])]
    cpu_ratio = [f / p for f, p in zip(cpu["factored"][k:], cpu["plain"][k:])]
    # The median hides DoGraph's periodic domain refits; the ratio of the sums includes them at their rate.
    total_ratio = sum(wall["factored"][k:]) / sum(wall["plain"][k:])
    return dict(spec, wall=wall, cpu=cpu, plain_s=statistics.median(wall["plain"][k:]),
                factored_s=statistics.median(wall["factored"][k:]), ratio=statistics.median(ratio),
                cpu_ratio=statistics.median(cpu_ratio), ratios=ratio, total_ratio=total_ratio,
                spread=(min(ratio), max(ratio)), refits=trainers["factored"].dograph_strategy.model.refits)


def optimizer_step(trainer, batch: dict) -> None:
    """One optimizer step of a trainer stepped by hand, as `Trainer.train()` does it without accumulation:
    `training_step`, gradient clipping, optimizer and scheduler step, `zero_grad`."""
    import torch

    trainer.training_step(trainer.model, {k: v.to(trainer.args.device) for k, v in batch.items()})
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad(set_to_none=True)


def paired_rounds(trainers: dict, batches: list[dict], device: str = "cpu",
                  after_round=None) -> tuple[dict, dict]:
    """Wall and CPU seconds of every step of two trainers that alternate on the same batches (order flipped
    every round): {name: [seconds per round]} each. A step is what `Trainer.train()` does per optimizer step:
    `training_step`, gradient clipping, optimizer and scheduler step, `zero_grad`. `after_round(r)`, if given,
    runs after round r's two steps (untimed; `sketch_floor.py` samples its kernels there). Works with any version
    of hf_dograph (only the Trainer's API is used): `tiny_step.py` times an older checkout with it."""
    import torch

    def step(t, b) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), _cpu_seconds()
        optimizer_step(t, b)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - w0, _cpu_seconds() - c0

    first, second = trainers
    wall = {k: [] for k in trainers}
    cpu = {k: [] for k in trainers}
    for r, b in enumerate(batches):
        for name in ((first, second) if r % 2 == 0 else (second, first)):
            w, c = step(trainers[name], b)
            wall[name].append(w)
            cpu[name].append(c)
        if after_round is not None:
            after_round(r)
    return wall, cpu


# ---------------------------------------------------------------------------------------------- driver
def _spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timeout after {timeout:.0f}s")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        return dict(spec, error=(res.stderr.strip().splitlines() or ["?"])[-1][:200])
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.time() - t0
    return out


def _median_memory(runs: list[dict]) -> dict:
    """One trainer's memory runs as one result: the median run's fields, with every run's memory kept."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out = dict(sorted(good, key=lambda r: r.get("training_mb", r["peak_mb"]))[(len(good) - 1) // 2])
    for key in ("training_mb", "peak_mb"):
        if key in out:
            out[key] = statistics.median(r[key] for r in good)
            out[key + "_runs"] = sorted(r[key] for r in good)
    return out


def _fmt_table(results: list[dict], paired: list[dict], device: str) -> str:
    """Markdown table: one row per (model, B, trainer)."""
    plain = {(r["model"], r["batch"]): r for r in results if r["trainer"] == "plain" and "error" not in r}
    pair = {(r["model"], r["batch"]): r for r in paired if "error" not in r}
    mem = "peak GPU MB" if device == "cuda" else "training MB"
    head = ("| model | B | T | trainer | step s | × plain: median per step (quartiles; range; ratio of sums) | "
            f"CPU × plain | {mem}: median (range) | × plain |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = [head]
    name = {"plain": "Trainer", "opacus": "DoGraph-opacus", "factored": "DoGraph-factored"}
    for r in results:
        key = (r["model"], r["batch"])
        if "error" in r:
            rows.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {name[r['trainer']]} | ({r['error']}) | | | | |")
            continue
        p, pr = plain.get(key), pair.get(key)
        memory = r["peak_mb"] if device == "cuda" else r.get("training_mb", r["peak_mb"])
        p_memory = (p["peak_mb"] if device == "cuda" else p.get("training_mb", p["peak_mb"])) if p else None
        m_ratio = f"{memory / p_memory:.2f}" if p_memory else "—"
        if r["trainer"] == "plain" and pr:
            step, t_ratio, c_ratio = f"{pr['plain_s']:.3f}", "1.00", "1.00"
        elif r["trainer"] == "factored" and pr:
            # The median per step is the headline: one stalled step of either trainer (a shared machine)
            # moves the ratio of sums, which includes DoGraph's periodic refits but also such stalls.
            lo, hi = pr.get("spread", (pr["ratio"], pr["ratio"]))
            q1, q3 = statistics.quantiles(pr["ratios"], n=4)[0::2] if len(pr.get("ratios", [])) > 1 else (lo, hi)
            step = f"{pr['factored_s']:.3f}"
            t_ratio = (f"**{pr['ratio']:.2f}** ({q1:.2f}–{q3:.2f}; {lo:.2f}–{hi:.2f}; "
                       f"{pr.get('total_ratio', pr['ratio']):.2f})")
            c_ratio = f"{pr['cpu_ratio']:.2f}"
        else:  # opacus: its own run only (tens of times the others' step: not worth pairing)
            step = f"{r['step_s']:.1f}"
            t_ratio = "—"
            c_ratio = f"{r['cpu_s'] / p['cpu_s']:.0f} (own runs)" if p else "—"
        spread = r.get("peak_mb_runs" if device == "cuda" else "training_mb_runs", [])
        mem_cell = f"{memory:.0f}" + (f" ({spread[0]:.0f}–{spread[-1]:.0f})" if len(spread) > 1 else "")
        rows.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {name[r['trainer']]} | {step} | {t_ratio} | "
                    f"{c_ratio} | {mem_cell} | {m_ratio} |")
    return "\n".join(rows)


def plot(results: list[dict], paired: list[dict], path: str, title: str = "") -> None:
    """Two panels per (model, B) point: DoGraph-factored's per-step time ratio to the plain step (every paired
    round, with its median and quartiles) and its training-memory ratio (median, range over the processes),
    each against the issue's bound (1.10× time, 1.3× memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [r for r in paired if "error" not in r and r.get("ratios")]
    plain = {(r["model"], r["batch"]): r for r in results if r.get("trainer") == "plain" and "error" not in r}
    fact = {(r["model"], r["batch"]): r for r in results if r.get("trainer") == "factored" and "error" not in r}
    labels = [f"{r['model']}\nB={r['batch']} T={r['seq']}" for r in pairs]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.boxplot([r["ratios"] for r in pairs], whis=(0, 100), widths=0.5)
    for i, r in enumerate(pairs, start=1):
        ax_t.scatter([i] * len(r["ratios"]), r["ratios"], s=8, alpha=0.35, color="tab:blue")
    ax_t.axhline(1.10, color="tab:red", ls="--", lw=1, label="issue's bound 1.10×")
    ax_t.axhline(1.0, color="gray", lw=0.8)
    ax_t.set_xticks(range(1, len(pairs) + 1), labels)
    ax_t.set_ylabel("DoGraph step / plain step (paired rounds)")
    ax_t.set_title("step time")
    ax_t.legend(loc="upper right", fontsize=8)
    mem_key = "peak_mb_runs" if any(r.get("device") == "cuda" for r in pairs) else "training_mb_runs"
    for i, r in enumerate(pairs, start=1):
        key = (r["model"], r["batch"])
        if key not in plain or key not in fact:
            continue
        base = statistics.median(plain[key].get(mem_key) or [plain[key]["peak_mb"]])
        runs = [m / base for m in (fact[key].get(mem_key) or [fact[key]["peak_mb"]])]
        mid = statistics.median(runs)
        ax_m.errorbar([i], [mid], yerr=[[mid - min(runs)], [max(runs) - mid]], fmt="o", color="tab:blue", capsize=4)
    ax_m.axhline(1.3, color="tab:red", ls="--", lw=1, label="issue's bound 1.3×")
    ax_m.axhline(1.0, color="gray", lw=0.8)
    ax_m.set_xticks(range(1, len(pairs) + 1), labels)
    ax_m.set_xlim(0.5, len(pairs) + 0.5)
    ax_m.set_ylabel("DoGraph / plain training memory")
    ax_m.set_title("memory (median of the processes, range)")
    ax_m.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="4x256, B = 8/16, opacus at B = 8 only")
    ap.add_argument("--grid", action="store_true",
                    help="the issue's grid: 2x64 B16 T128, 2x128 B32 T128, 4x256 B16 T256, 6x512 B8 T256 "
                         "(plain and factored; --rounds paired rounds each)")
    ap.add_argument("--models", default="4x256,6x512")
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--trainers", default="plain,opacus,factored")
    ap.add_argument("--opacus-models", default="4x256", help="models on which the opacus engine runs")
    ap.add_argument("--opacus-batch-sizes", default="8,16", help="batch sizes for opacus")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds of the paired timing (median)")
    ap.add_argument("--projection-dim", type=int, default=1024)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each point (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--memory-runs", type=int, default=3,
                    help="fresh processes per trainer for the peak memory (median; opacus runs once)")
    ap.add_argument("--json", help="also write all results to this JSON file")
    ap.add_argument("--plot", help="also draw the DoGraph/plain time and memory ratios into this PNG")
    ap.add_argument("--replot", metavar="JSON", help="no runs: draw --plot from an earlier --json file")
    a = ap.parse_args(argv)
    if a.replot:
        if not a.plot:
            ap.error("--replot needs --plot PATH")
        doc = json.loads(open(a.replot).read())
        plot(doc["points"], doc["paired"], a.plot, title=doc.get("command", ""))
        print(f"wrote {a.plot}")
        return
    if a.worker:
        spec = json.loads(a.worker)
        fn = run_paired if spec.get("paired") else run_point
        print("RESULT " + json.dumps(fn(spec)), flush=True)
        return
    if a.quick:
        a.models, a.batch_sizes, a.opacus_batch_sizes = "4x256", "8,16", "8"
    models = a.models.split(",")
    batches = [int(b) for b in a.batch_sizes.split(",")]
    op_batches = [int(b) for b in a.opacus_batch_sizes.split(",")]
    trainers = a.trainers.split(",")
    results, paired = [], []
    t_start = time.time()
    load0 = os.getloadavg()

    def log(r, what):
        if "error" in r:
            msg = r["error"]
        elif "ratio" in r:
            msg = (f"plain {r['plain_s']:.2f} s, factored {r['factored_s']:.2f} s: × {r['ratio']:.2f} wall, "
                   f"× {r['cpu_ratio']:.2f} CPU")
        else:
            msg = f"{r['step_s']:.2f} s/step ({r['cpu_s']:.2f} CPU s), peak {r['peak_mb']:.0f} MB"
        print(f"[{time.time() - t_start:6.0f}s] {r['model']} B={r['batch']} {what}: {msg}", file=sys.stderr, flush=True)

    common = dict(seq=a.seq, device=a.device, bf16=a.bf16, threads=a.threads, projection_dim=a.projection_dim)
    points = [(m, b, a.seq) for m in models for b in batches]
    if a.grid:
        points, trainers = GRID, ["plain", "factored"]
    for model, b, seq in points:
        common["seq"] = seq
        # Peak memory: each trainer in a fresh process, one step (optimizer state allocated beforehand);
        # --memory-runs processes per trainer, the trainers alternating, the median kept (a single peak RSS
        # moves by ±10 MB from run to run at the smallest sizes).
        kinds = [k for k in trainers if not (k == "opacus" and (model not in a.opacus_models.split(",")
                                                                 or b not in op_batches))]
        runs = {k: [] for k in kinds}
        for i in range(a.memory_runs):
            for kind in kinds:
                if kind == "opacus" and i > 0:
                    continue  # minutes per run: once is enough for its order of magnitude
                spec = dict(common, model=model, batch=b, trainer=kind, warmup=1, steps=1)
                runs[kind].append(_spawn(spec, a.timeout))
                log(runs[kind][-1], kind)
        results.extend(_median_memory(runs[k]) for k in kinds)
        # Step time: plain and factored alternating in one process.
        if "plain" in trainers and "factored" in trainers:
            spec = dict(common, model=model, batch=b, paired=True, warmup=1, steps=a.rounds)
            paired.append(_spawn(spec, a.timeout))
            log(paired[-1], "paired timing")
    load1 = os.getloadavg()
    import torch

    print(f"\nCommand: python benchmarks/step_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads={a.threads or torch.get_num_threads()}, device={a.device}, seq={a.seq}, "
          f"projection_dim={a.projection_dim}; total {time.time() - t_start:.0f} s; "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end")
    print(_fmt_table(results, paired, a.device))
    eng = next((r.get("engine") for r in results if r.get("engine")), None)
    if eng:
        print(f"factored engine: {eng}")
    command = f"python benchmarks/step_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "points": results, "paired": paired}, f, indent=1)
    if a.plot:
        plot(results, paired, a.plot, title=command)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
