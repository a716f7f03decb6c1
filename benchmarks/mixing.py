"""Data-mixing benchmark: DoGraph's objectives (persistent domains and per-batch) against uniform mixing and
two baselines, side by side.

Every strategy is a `mixing_strategy` of the same `DoGraphTrainer`, so only the per-sample weighting
differs: same GPT-2 (from scratch, byte tokenizer, ~1.05M parameters by default), same token budget
(steps x batch x seq_len), same initial weights and data order for a given seed. Reported per strategy and
dataset: per-domain validation perplexity, its mean over domains, the worst domain, and training wall time,
as mean ± std over fresh seeds, plus the paired difference to `uniform` (same seed = same init and
batches), the effective sample size of each strategy's weights, and how smoothly DoGraph's weights moved.

    python benchmarks/mixing.py --calibrate      # 1. the selection seed: shared learning rate, then an equal
                                                 #    grid for DoGraph's defaults and each baseline's knob
    python benchmarks/mixing.py                  # 2. the benchmark (11 strategies x 3 seeds x 2 datasets)
    python benchmarks/mixing.py --quick          # the pipeline check CI runs (~15 s)
    python benchmarks/mixing.py --replot         # table and plots again from results.json
    python benchmarks/mixing.py --strategies uniform,dograph-uncertainty --seeds 0,1 --lrs 3e-3

Strategies (`--strategies`, names below; `name:key=value,...` overrides any DoGraphConfig field):
  uniform                      the plain mean gradient (the Trainer's step)
  loss_reweighting             softmax of batch-normalized per-sample losses (Sow et al., ICLR 2025)
  group_dro                    exponentiated-gradient weights over the HUMAN domain labels
  dograph-<objective>          DoGraph with persistent domains (the default), objective in
                               uncertainty/variance/robust/alignment
  dograph-<objective>@batch    DoGraph per micro-batch (the paper read literally: K-means per batch,
                               α_i = w_j / n_j)
  dograph-<objective>+graph    either of the above with the domain-graph term (graph_lambda = --graph-lambda)
  plain-trainer                reference only: `transformers.Trainer` (no per-sample machinery) at
                               uniform's learning rate, for wall time; not part of the comparison

Tuning is equal for everyone. The learning rate is one for all strategies: the one of `--lrs` with the
lowest mean-over-domains perplexity for `uniform` on the selection seed (`--selection-seed`, not among the
reported seeds); `--calibrate` writes it to <output-dir>/calibration.json, with the choice of each
family's settings from a grid of the same size (DoGraph's persistent `uncertainty`: mapping, smoothing and ε;
loss_reweighting: temperature; group_dro: step size), chosen by the same rule (below). The benchmark then
reads calibration.json. With several `--lrs` and no calibration each strategy sweeps them itself.

Choice rule (the target of the project's issue): the lowest worst-domain perplexity among settings whose
mean perplexity is within 2% of uniform's; if none is, the lowest mean perplexity.

Runs go to a pool of `--workers` processes with `--threads` torch threads each (1 thread per process
is much faster than 2 on a 2-core machine that others share). Outputs in `--output-dir`
(default outputs/benchmarks/mixing/): results.json (every run and the summary), table.md, and one
PNG per dataset. `--resume` reuses finished runs stored in <output-dir>/runs/ by the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The RedPajama sample lives beside the checkout (../shared/data), as in CI.
REDPAJAMA_DIR = REPO_ROOT.parent / "shared" / "data" / "redpajama_sample"

OBJECTIVES = ("uncertainty", "variance", "robust", "alignment")
BASELINES = ("uniform", "loss_reweighting", "group_dro")
ALL_STRATEGIES = BASELINES + tuple(f"dograph-{o}" for o in OBJECTIVES) + tuple(f"dograph-{o}@batch" for o in OBJECTIVES)
REFERENCE = "plain-trainer"  # plain transformers.Trainer: wall-time reference, not a mixing strategy
QUICK_STRATEGIES = ("uniform", "loss_reweighting", "group_dro",
                    "dograph-uncertainty:domain_warmup_samples=16,domain_window=32,domain_refit_steps=2",
                    "dograph-robust@batch+graph")
# The calibration grids (`--calibrate`): the same number of settings for every family with a knob.
CALIBRATION_GRID = {
    # Explicit ε: the calibration ran when the package default was 0.1; it chose 1.0, now the default.
    "dograph-uncertainty": [
        {"uncertainty_eps": 0.1},  # the package defaults then: 'sample' mapping, weight_smoothing 0.1
        {"uncertainty_eps": 0.1, "weight_mapping": "domain"},
        {"uncertainty_eps": 0.1, "weight_smoothing": 1.0},
        {"uncertainty_eps": 1.0},
    ],
    "loss_reweighting": [{}, {"loss_reweighting_temperature": 0.5}, {"loss_reweighting_temperature": 2.0},
                         {"loss_reweighting_temperature": 4.0}],
    "group_dro": [{}, {"group_dro_step_size": 0.003}, {"group_dro_step_size": 0.03},
                  {"group_dro_step_size": 0.1}],
}
MEAN_TOLERANCE = 0.02  # the choice rule's "mean within 2% of uniform"


# ------------------------------------------------------------------------------------------- settings
@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (a run's cache key hashes the parts that change its result)."""

    strategies: list[str] = field(default_factory=lambda: list(ALL_STRATEGIES))
    datasets: list[str] = field(default_factory=lambda: ["embedded", "redpajama"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    selection_seed: int = 100
    lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3])
    reference: bool = True  # add the plain-Trainer wall-time reference (first seed only)
    # Model: a GPT-2 from scratch on bytes (259 tokens): 4 x 144, 1.04M parameters.
    n_layer: int = 4
    n_embd: int = 144
    n_head: int = 4
    # Token budget: identical for every strategy.
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 32  # bytes: short, so that 11 strategies x 3 seeds x 2 datasets x 1000 steps fit on 2 CPU cores
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # DoGraph: the paper's m and the package's default sketch size, for every variant.
    num_domains: int = 11
    projection_dim: int = 1024
    graph_lambda: float = 0.1
    grad_engine: str = "factored"
    # Data.
    embedded_chars: int = 2_000_000
    redpajama_bytes_per_domain: int = 512_000  # cap: no source takes over; cc (60 kB) stays the rare one
    redpajama_dir: str = str(REDPAJAMA_DIR)
    validation_fraction: float = 0.1
    max_validation_sequences_per_domain: int = 48
    eval_batch_size: int = 32
    # The calibration's choices (read from calibration.json): {family: DoGraphConfig overrides}.
    family_overrides: dict = field(default_factory=dict)
    # Execution.
    workers: int = 2
    threads: int = 1
    output_dir: str = "outputs/benchmarks/mixing"
    resume: bool = False

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len


def quick_config(**overrides) -> BenchConfig:
    """The CI pipeline check: five strategies covering every weighting code path, a few steps, one seed,
    a small model, the embedded corpus only, no sweep."""
    cfg = BenchConfig(
        strategies=list(QUICK_STRATEGIES), datasets=["embedded"], seeds=[0], lrs=[3e-3], steps=6,
        n_layer=2, n_embd=32, batch_size=8, seq_len=64, num_domains=4, projection_dim=64, embedded_chars=40_000,
        max_validation_sequences_per_domain=8, workers=1, output_dir="outputs/benchmarks/mixing-quick",
    )
    return dataclasses.replace(cfg, **overrides)


def _parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def strategy_settings(name: str, cfg: BenchConfig) -> dict:
    """DoGraph settings (keyword arguments of `DoGraphConfig`) for a strategy name (see the module docstring)."""
    base, _, overrides = name.partition(":")
    extra = {}
    for item in filter(None, overrides.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"strategy {name!r}: overrides are key=value pairs")
        extra[key.strip()] = _parse_value(value.strip())
    family = cfg.family_overrides.get(base, {})
    if base in BASELINES:
        return {"mixing_strategy": base, **family, **extra}
    if base.startswith("dograph-"):
        rest, _, graph = base[len("dograph-"):].partition("+")
        objective, _, mode = rest.partition("@")
        if objective not in OBJECTIVES or graph not in ("", "graph") or mode not in ("", "batch"):
            raise ValueError(f"unknown strategy {name!r}")
        # The per-batch mode runs as the project shipped it before persistent domains: ε = 0.1 × mean σ².
        today = {"domain_mode": "per_batch", "uncertainty_eps": 0.1} if mode else {"domain_mode": "persistent"}
        return {
            "mixing_strategy": "dograph",
            "objective": objective,
            **today,
            "graph_lambda": cfg.graph_lambda if graph else 0.0,
            "num_domains": cfg.num_domains,
            **family,
            **extra,
        }
    raise ValueError(f"unknown strategy {name!r}: use one of {', '.join(ALL_STRATEGIES)} or {REFERENCE}")


def resolve_engine(requested: str) -> str:
    """The fast factored engine when this checkout has it, else the reference (opacus) one."""
    from hf_dograph.sketch import ENGINES

    return requested if requested in ENGINES else "opacus"


# ------------------------------------------------------------------------------------------------ data
def capped_redpajama(src: Path, dst: Path, bytes_per_domain: int) -> Path:
    """A copy of the RedPajama sample folder holding at most `bytes_per_domain` of text per domain
    (documents in file order, the last one cut), so that every domain is small and none dominates.

    Written into a temporary folder and renamed into place, so that a reader never sees a half-written copy;
    `prepare_data` builds it once in the main process before any worker starts."""
    marker = dst / f".cap-{bytes_per_domain}"
    if marker.exists():
        return dst
    tmp = Path(tempfile.mkdtemp(prefix=".capped-", dir=dst.parent if dst.parent.exists() else None))
    for domain_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        out = tmp / domain_dir.name
        out.mkdir(parents=True, exist_ok=True)
        left = bytes_per_domain
        with open(out / "part1.jsonl", "w", encoding="utf-8") as sink:
            for path in sorted(domain_dir.glob("*.jsonl")):
                for line in open(path, encoding="utf-8"):
                    if left <= 0:
                        break
                    text = json.loads(line).get("text") or ""
                    raw = text.encode("utf-8")[:left]
                    left -= len(raw)
                    sink.write(json.dumps({"text": raw.decode("utf-8", errors="ignore")}) + "\n")
    (tmp / marker.name).touch()
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dst)
    return dst


def prepare_data(cfg: BenchConfig, datasets: list[str]) -> None:
    """Build every dataset's files once, here, before workers start (they then only read them)."""
    for name in datasets:
        data_spec(name, cfg)


def available_datasets(cfg: BenchConfig) -> tuple[list[str], dict[str, str]]:
    """The datasets to run and, for those skipped, why (the RedPajama sample may be absent)."""
    run, skipped = [], {}
    for name in cfg.datasets:
        if name == "redpajama" and not Path(cfg.redpajama_dir).is_dir():
            skipped[name] = f"not found at {cfg.redpajama_dir}"
        elif name not in ("embedded", "redpajama"):
            raise ValueError(f"unknown dataset {name!r}: use embedded and/or redpajama")
        else:
            run.append(name)
    return run, skipped


def data_spec(name: str, cfg: BenchConfig):
    """The `DataSpec` of a benchmark dataset (its validation split is the same for every run)."""
    from hf_dograph.data import DataSpec

    common = dict(
        seq_len=cfg.seq_len, packing="pack", validation_fraction=cfg.validation_fraction,
        max_validation_sequences_per_domain=cfg.max_validation_sequences_per_domain, seed=0,
    )
    if name == "embedded":
        return DataSpec(source="embedded", embedded_chars=cfg.embedded_chars, **common)
    cache = (Path(cfg.output_dir) / "data" / "redpajama_capped").resolve()
    path = capped_redpajama(Path(cfg.redpajama_dir), cache, cfg.redpajama_bytes_per_domain)
    return DataSpec(source="folder", path=str(path), **common)


_DATA_CACHE: dict = {}


def load_data(name: str, cfg: BenchConfig):
    """(tokenizer, DomainDataset), built once per process and dataset."""
    from hf_dograph.data import build_domain_dataset, load_tokenizer

    if name not in _DATA_CACHE:
        tok = load_tokenizer("bytes")
        _DATA_CACHE[name] = (tok, build_domain_dataset(data_spec(name, cfg), tok))
    return _DATA_CACHE[name]


# ------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Job:
    dataset: str
    strategy: str
    lr: float
    seed: int
    phase: str  # "sweep" or "final"

    @property
    def key(self) -> str:
        return f"{self.dataset}__{self.strategy}__lr{self.lr:g}__seed{self.seed}"


def _fingerprint(cfg: BenchConfig) -> str:
    """Hash of the settings that change a run's result (not the strategy list, seeds or workers)."""
    skip = {"strategies", "datasets", "seeds", "selection_seed", "lrs", "reference", "workers", "output_dir",
            "resume"}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def build_model(tokenizer, cfg: BenchConfig, seed: int):
    """A freshly initialized small GPT-2: the same weights for every strategy at a given seed."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: far under one epoch there is nothing to regularize, and it only adds noise.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _weight_shares(history: list[dict], names: list[str]) -> dict | None:
    """Mean share of the gradient weight α each human domain received, next to its share of samples."""
    mass = [e["human_mass"] for e in history if "human_mass" in e]
    if not mass:
        return None
    share = [e["human_share"] for e in history if "human_share" in e]
    return {
        name: {
            "weight": sum(m.get(i, m.get(str(i), 0.0)) for m in mass) / len(mass),
            "samples": sum(s.get(i, s.get(str(i), 0.0)) for s in share) / len(share),
        }
        for i, name in enumerate(names)
    }


def weight_statistics(history: list[dict], batch_size: int) -> dict:
    """How concentrated and how steady a strategy's weights were, from the trainer's weight history:
    the effective batch (Kish ESS of the step's α, in samples), the weight DoGraph's per-batch mode gave to
    one-sample clusters, and (persistent domains) the mean step-to-step change Σ_j |Δw_j| of the domain
    weights (0 = constant; 2 = all weight moving to another domain each step)."""
    ess = [e["ess"] * batch_size for e in history if "ess" in e]
    single = [sum(w for w, n in zip(e["domain_weights"], e.get("cluster_sizes", [])) if n == 1)
              for e in history if not e.get("persistent", True) and "cluster_sizes" in e]
    persistent = [e["domain_weights"] for e in history if e.get("persistent") and not e.get("warmup")]
    moves = [sum(abs(a - b) for a, b in zip(w1, w0)) for w0, w1 in zip(persistent, persistent[1:])
             if len(w0) == len(w1)]
    return {"effective_batch": _mean(ess), "singleton_weight": _mean(single) if single else None,
            "weight_change": _mean(moves) if moves else None}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def run_job(job: Job, cfg: BenchConfig) -> dict:
    """Train one model with one strategy, evaluate it per domain; returns a JSON-ready record."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import PrinterCallback, Trainer

    from hf_dograph import DoGraphConfig, DoGraphTrainer
    from hf_dograph.data import DomainCollator
    from hf_dograph.evaluation import evaluate_per_domain

    torch.set_num_threads(cfg.threads)
    tokenizer, data = load_data(job.dataset, cfg)
    model = build_model(tokenizer, cfg, job.seed)
    plain = job.strategy == REFERENCE
    settings = {} if plain else strategy_settings(job.strategy, cfg)
    with tempfile.TemporaryDirectory(prefix="mixing-") as out:
        args = DoGraphConfig(
            output_dir=out, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=job.lr, lr_scheduler_type="cosine", warmup_steps=max(1, round(cfg.warmup_ratio * cfg.steps)),
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=job.seed,
            logging_steps=max(1, cfg.steps), save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
            projection_dim=cfg.projection_dim, projection_seed=job.seed, grad_engine=resolve_engine(cfg.grad_engine),
            **settings,
        )
        trainer_cls = Trainer if plain else DoGraphTrainer
        collator = DomainCollator.for_tokenizer(tokenizer, keep_domain=not plain)
        trainer = trainer_cls(model=model, args=args, train_dataset=data.train, data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # the progress bar reports; no log dict per run
        start = time.perf_counter()
        train_output = trainer.train()
        wall = time.perf_counter() - start
    eval_collator = DomainCollator.for_tokenizer(tokenizer, keep_domain=True)
    result = evaluate_per_domain(trainer.model, data.validation, eval_collator, data.domain_names,
                                 batch_size=cfg.eval_batch_size)
    ppl = result.perplexity
    worst = max(range(len(ppl)), key=lambda i: ppl[i] if result.tokens[i] else -math.inf)
    return {
        **dataclasses.asdict(job),
        "engine": None if plain else args.grad_engine,
        "settings": settings,
        "domains": data.domain_names,
        "perplexity": dict(zip(data.domain_names, ppl)),
        "mean_perplexity": result.mean_perplexity,
        "worst_domain": data.domain_names[worst],
        "worst_perplexity": ppl[worst],
        "overall_perplexity": math.exp(result.overall_loss),
        "train_loss": float(train_output.training_loss),
        "wall_s": wall,
        "tokens": cfg.tokens_per_run,
        "weight_shares": None if plain else _weight_shares(trainer.flush_dograph_history(), data.domain_names),
        **({} if plain else weight_statistics(trainer.dograph_history, cfg.batch_size)),
    }


def run_job_cached(job: Job, cfg: BenchConfig) -> dict:
    """`run_job`, reusing (with --resume) or storing the record under <output-dir>/runs/."""
    path = Path(cfg.output_dir) / "runs" / f"{job.key}.json"
    fp = _fingerprint(cfg)
    if cfg.resume and path.exists():
        record = json.loads(path.read_text())
        if record.get("fingerprint") == fp:
            record["phase"] = job.phase
            return record
    record = run_job(job, cfg)
    record["fingerprint"] = fp
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def _quiet() -> None:
    """Offline, and no per-run warnings (the same few for every run) over the progress bar."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _worker_init(threads: int) -> None:
    _quiet()
    import torch

    torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------- schedule
def select_lr(records: list[dict]) -> float:
    """The learning rate of the sweep run with the lowest mean-over-domains perplexity (ties: the smaller
    rate; a diverged run, NaN, never wins)."""
    finite = [r for r in records if math.isfinite(r["mean_perplexity"])]
    pool = finite or records
    return min(pool, key=lambda r: (r["mean_perplexity"] if finite else 0.0, r["lr"]))["lr"]


class Scheduler:
    """Plans the runs: the sweep first; each (dataset, strategy)'s final seeds as soon as its sweep is
    done (the plain-Trainer reference follows uniform's choice), so that the pool never idles."""

    def __init__(self, cfg: BenchConfig, datasets: list[str]):
        self.cfg = cfg
        self.sweep = len(cfg.lrs) > 1
        self.pending_sweep: dict[tuple[str, str], list[dict]] = {}
        self.chosen: dict[tuple[str, str], float] = {}
        self.initial: list[Job] = []
        for ds in datasets:
            for strategy in cfg.strategies:
                if self.sweep:
                    self.pending_sweep[(ds, strategy)] = []
                    self.initial += [Job(ds, strategy, lr, cfg.selection_seed, "sweep") for lr in cfg.lrs]
                else:
                    self.initial += self._finals(ds, strategy, cfg.lrs[0])
            if cfg.reference and not (self.sweep and "uniform" in cfg.strategies):
                # Without a sweep of uniform to follow, the reference takes the first learning rate.
                self.initial += self._finals(ds, REFERENCE, cfg.lrs[0])

    @property
    def total(self) -> int:
        per = len(self.cfg.lrs) + len(self.cfg.seeds) if self.sweep else len(self.cfg.seeds)
        n_ds = len({j.dataset for j in self.initial})
        return n_ds * (len(self.cfg.strategies) * per + (1 if self.cfg.reference else 0))

    def _finals(self, ds: str, strategy: str, lr: float) -> list[Job]:
        self.chosen[(ds, strategy)] = lr
        # The wall-time reference needs one run per dataset, not a spread.
        seeds = self.cfg.seeds[:1] if strategy == REFERENCE else self.cfg.seeds
        return [Job(ds, strategy, lr, seed, "final") for seed in seeds]

    def done(self, record: dict) -> list[Job]:
        """New jobs unlocked by a finished run."""
        if record["phase"] != "sweep":
            return []
        key = (record["dataset"], record["strategy"])
        self.pending_sweep[key].append(record)
        if len(self.pending_sweep[key]) < len(self.cfg.lrs):
            return []
        jobs = self._finals(*key, select_lr(self.pending_sweep[key]))
        if self.cfg.reference and key[1] == "uniform":  # the reference follows uniform's choice
            jobs += self._finals(key[0], REFERENCE, self.chosen[key])
        return jobs


def run_all(cfg: BenchConfig, datasets: list[str], progress: bool = True) -> list[dict]:
    """Every run of the benchmark (sweep and final), in a process pool or, with one worker, in-process."""
    from tqdm.auto import tqdm

    prepare_data(cfg, datasets)
    sched = Scheduler(cfg, datasets)
    records: list[dict] = []
    bar = tqdm(total=sched.total, desc="mixing runs", unit="run", disable=not progress, dynamic_ncols=True)

    def finish(record: dict) -> list[Job]:
        records.append(record)
        bar.set_postfix_str(f"{record['dataset']}/{record['strategy']} lr={record['lr']:g} "
                            f"s={record['seed']} ppl={record['mean_perplexity']:.2f}")
        bar.update()
        return sched.done(record)

    if cfg.workers <= 1:
        queue = list(sched.initial)
        while queue:
            queue += finish(run_job_cached(queue.pop(0), cfg))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init, initargs=(cfg.threads,)) as pool:
            running: set[Future] = {pool.submit(run_job_cached, j, cfg) for j in sched.initial}
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    for job in finish(fut.result()):
                        running.add(pool.submit(run_job_cached, job, cfg))
    bar.close()
    return records


# ----------------------------------------------------------------------------------------- calibration
def choose(records: list[dict], uniform: dict) -> dict:
    """The choice rule: lowest worst-domain perplexity among records whose mean perplexity is within
    MEAN_TOLERANCE of uniform's; if none is, the lowest mean perplexity (a diverged run never wins)."""
    finite = [r for r in records if math.isfinite(r["mean_perplexity"])] or records
    ok = [r for r in finite if r["mean_perplexity"] <= (1 + MEAN_TOLERANCE) * uniform["mean_perplexity"]]
    if ok:
        return min(ok, key=lambda r: (r["worst_perplexity"], r["mean_perplexity"]))
    return min(finite, key=lambda r: r["mean_perplexity"])


def run_jobs(jobs: list[Job], cfg: BenchConfig, desc: str, progress: bool = True) -> list[dict]:
    """Run independent jobs in the pool (or in-process with one worker), with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=not progress, dynamic_ncols=True)
    records = []

    def finish(record):
        records.append(record)
        bar.set_postfix_str(f"{record['strategy']} lr={record['lr']:g} ppl={record['mean_perplexity']:.2f} "
                            f"worst={record['worst_perplexity']:.2f}")
        bar.update()

    if cfg.workers <= 1:
        for job in jobs:
            finish(run_job_cached(job, cfg))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init, initargs=(cfg.threads,)) as pool:
            for fut in [pool.submit(run_job_cached, j, cfg) for j in jobs]:
                finish(fut.result())
    bar.close()
    return records


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("strategy", "lr", "seed", "mean_perplexity", "worst_perplexity", "worst_domain",
                              "effective_batch", "wall_s") if k in r}


def run_calibration(cfg: BenchConfig, dataset: str = "redpajama", progress: bool = True) -> dict:
    """On the selection seed: the shared learning rate (uniform's best of `--lrs`), then each family's setting
    from its grid (CALIBRATION_GRID, equal sizes) by the choice rule. Writes calibration.json."""
    datasets, skipped = available_datasets(dataclasses.replace(cfg, datasets=[dataset]))
    if not datasets:
        raise SystemExit(f"calibration needs the {dataset} data: {skipped.get(dataset)}")
    seed = cfg.selection_seed
    start = time.perf_counter()
    prepare_data(cfg, datasets)
    lr_runs = run_jobs([Job(dataset, "uniform", lr, seed, "calibration") for lr in cfg.lrs], cfg,
                       "calibration: learning rate", progress)
    lr = select_lr(lr_runs)
    uniform = next(r for r in lr_runs if r["lr"] == lr)
    names = [(family, overrides, family + (":" + ",".join(f"{k}={v}" for k, v in overrides.items())
                                             if overrides else ""))
             for family, grid in CALIBRATION_GRID.items() for overrides in grid]
    runs = run_jobs([Job(dataset, name, lr, seed, "calibration") for _, _, name in names], cfg,
                    "calibration: settings", progress)
    by_name = {r["strategy"]: r for r in runs}
    families = {}
    for family in CALIBRATION_GRID:
        candidates = [(overrides, by_name[name]) for f, overrides, name in names if f == family]
        best = choose([r for _, r in candidates], uniform)
        chosen = next(o for o, r in candidates if r is best)
        families[family] = {"chosen": chosen, "runs": [dict(_brief(r), overrides=o) for o, r in candidates]}
    doc = {"dataset": dataset, "selection_seed": seed, "lr": lr, "rule": choose.__doc__.split(":", 1)[1].strip(),
           "lr_runs": [_brief(r) for r in lr_runs], "uniform": _brief(uniform), "families": families,
           "wall_s": time.perf_counter() - start, "config": dataclasses.asdict(cfg)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(doc, indent=1))
    return doc


def apply_calibration(cfg: BenchConfig) -> BenchConfig:
    """The benchmark's settings with calibration.json's learning rate and each family's chosen setting."""
    path = Path(cfg.output_dir) / "calibration.json"
    if not path.exists():
        return cfg
    doc = json.loads(path.read_text())
    overrides = {f: v["chosen"] for f, v in doc["families"].items() if v["chosen"]}
    return dataclasses.replace(cfg, lrs=[doc["lr"]], family_overrides=overrides)


def calibration_table(doc: dict) -> str:
    lines = [f"Calibration on {doc['dataset']}, selection seed {doc['selection_seed']}: learning rate "
             f"{doc['lr']:g} (uniform's best of " + ", ".join(f"{r['lr']:g} → {r['mean_perplexity']:.3f}"
                                                             for r in doc["lr_runs"]) + ")", "",
             "| family | setting | mean ppl | worst-domain ppl | eff. batch | chosen |", "|---|---|---|---|---|---|"]
    u = doc["uniform"]
    lines.append(f"| uniform | — | {u['mean_perplexity']:.3f} | {u['worst_perplexity']:.3f} | — | |")
    for family, block in doc["families"].items():
        for r in block["runs"]:
            setting = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "package default"
            mark = "✔" if r["overrides"] == block["chosen"] else ""
            eb = f"{r['effective_batch']:.1f}" if r.get("effective_batch") else "—"
            lines.append(f"| {family} | {setting} | {r['mean_perplexity']:.3f} | {r['worst_perplexity']:.3f} | {eb} "
                         f"| {mark} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict], cfg: BenchConfig) -> dict:
    """Per dataset and strategy: mean ± std over the final seeds, and the paired Δ to uniform."""
    final = [r for r in records if r["phase"] == "final"]
    order = [s for s in list(cfg.strategies) + [REFERENCE] if any(r["strategy"] == s for r in final)]
    out: dict = {}
    for ds in dict.fromkeys(r["dataset"] for r in final):
        rows = {}
        base = {r["seed"]: r for r in final if r["dataset"] == ds and r["strategy"] == "uniform"}
        for strategy in order:
            runs = sorted((r for r in final if r["dataset"] == ds and r["strategy"] == strategy), key=lambda r: r["seed"])
            if not runs:
                continue
            domains = runs[0]["domains"]
            worst_names = [r["worst_domain"] for r in runs]
            row = {
                "lr": runs[0]["lr"],
                "seeds": [r["seed"] for r in runs],
                "mean_perplexity": _mean_std([r["mean_perplexity"] for r in runs]),
                "worst_perplexity": _mean_std([r["worst_perplexity"] for r in runs]),
                "worst_domain": max(set(worst_names), key=worst_names.count),
                "overall_perplexity": _mean_std([r["overall_perplexity"] for r in runs]),
                "wall_s": _mean_std([r["wall_s"] for r in runs]),
                "per_domain": {d: _mean_std([r["perplexity"][d] for r in runs]) for d in domains},
            }
            for key in ("effective_batch", "singleton_weight", "weight_change"):
                values = [r.get(key) for r in runs]
                row[key] = _mean_std(values) if all(v is not None for v in values) else None
            paired = [r for r in runs if r["seed"] in base]
            if paired and strategy != "uniform":
                row["delta_mean_vs_uniform"] = _mean_std(
                    [r["mean_perplexity"] - base[r["seed"]]["mean_perplexity"] for r in paired])
                row["delta_worst_vs_uniform"] = _mean_std(
                    [r["worst_perplexity"] - base[r["seed"]]["worst_perplexity"] for r in paired])
            shares = [r["weight_shares"] for r in runs if r.get("weight_shares")]
            if shares:
                row["weight_share"] = {d: statistics.fmean(s[d]["weight"] for s in shares) for d in domains}
                row["sample_share"] = {d: statistics.fmean(s[d]["samples"] for s in shares) for d in domains}
            rows[strategy] = row
        out[ds] = {"domains": final[[r["dataset"] for r in final].index(ds)]["domains"], "strategies": rows}
    return out


def _pm(ms, digits: int = 3, sign: bool = False) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "nan"
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if sign else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_tables(summary: dict, cfg: BenchConfig) -> str:
    """Two markdown tables per dataset: the headline numbers, then perplexity per domain."""
    lines = []
    for ds, block in summary.items():
        rows, domains = block["strategies"], block["domains"]
        best_mean = min(r["mean_perplexity"][0] for s, r in rows.items() if s != REFERENCE)
        best_worst = min(r["worst_perplexity"][0] for s, r in rows.items() if s != REFERENCE)
        lines += [f"### {ds}: {len(domains)} domains, {cfg.tokens_per_run:,} training tokens per run, "
                  f"seeds {', '.join(map(str, cfg.seeds))}", "",
                  "| strategy | lr | mean ppl over domains | Δ mean vs uniform (paired) | worst-domain ppl "
                  f"| Δ worst vs uniform (paired) | worst domain | eff. batch (of {cfg.batch_size}) "
                  "| weight on 1-sample clusters | weight change per step | train wall (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for strategy, r in rows.items():
            mean = _pm(r["mean_perplexity"])
            worst = _pm(r["worst_perplexity"])
            # Bold: the best (lowest) of the mixing strategies.
            mean = f"**{mean}**" if r["mean_perplexity"][0] == best_mean and strategy != REFERENCE else mean
            worst = f"**{worst}**" if r["worst_perplexity"][0] == best_worst and strategy != REFERENCE else worst
            d_mean = _pm(r["delta_mean_vs_uniform"], sign=True) if "delta_mean_vs_uniform" in r else "—"
            d_worst = _pm(r["delta_worst_vs_uniform"], sign=True) if "delta_worst_vs_uniform" in r else "—"
            label = f"{strategy} (reference)" if strategy == REFERENCE else strategy
            ess = _pm(r["effective_batch"], 1) if r.get("effective_batch") else "—"
            single = _pm(r["singleton_weight"], 2) if r.get("singleton_weight") else "—"
            change = _pm(r["weight_change"], 3) if r.get("weight_change") else "—"
            lines.append(f"| {label} | {r['lr']:g} | {mean} | {d_mean} | {worst} | {d_worst} | {r['worst_domain']} "
                         f"| {ess} | {single} | {change} | {_pm(r['wall_s'], 1)} |")
        lines += ["", f"Per-domain validation perplexity ({ds}, mean ± std over seeds):", "",
                  "| strategy | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for strategy, r in rows.items():
            lines.append(f"| {strategy} | " + " | ".join(_pm(r["per_domain"][d], 2) for d in domains) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per dataset: per-domain perplexity relative to uniform (heat map), and mean vs worst-domain
    perplexity with seed error bars (lower-left is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for ds, block in summary.items():
        rows = {s: r for s, r in block["strategies"].items()}
        names, domains = list(rows), block["domains"]
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(21, 0.45 * len(names) + 3),
                                            gridspec_kw={"width_ratios": [1.3, 1, 1]})
        ref = rows.get("uniform")
        mat = np.array([[r["per_domain"][d][0] for d in domains] for r in rows.values()])
        if ref is not None:
            base = np.array([ref["per_domain"][d][0] for d in domains])
            rel = 100.0 * (mat / base - 1.0)
            # Capped at ±30% so that one diverged run does not wash out every other colour.
            lim = min(30.0, max(1.0, float(np.nanmax(np.abs(rel)))))
            im = ax1.imshow(rel, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            fig.colorbar(im, ax=ax1, label="perplexity vs uniform (%, capped)")
        else:
            im = ax1.imshow(mat, aspect="auto")
            fig.colorbar(im, ax=ax1, label="perplexity")
        for i in range(len(names)):
            for j in range(len(domains)):
                ax1.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax1.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax1.set_yticks(range(len(names)), names)
        ax1.set_title(f"{ds}: per-domain validation perplexity (colour: % vs uniform; blue is better)")
        cmap = plt.get_cmap("tab20")
        for i, (s, r) in enumerate(rows.items()):
            (mx, sx), (my, sy) = r["mean_perplexity"], r["worst_perplexity"]
            marker = "s" if s in BASELINES or s == REFERENCE else ("^" if "@batch" in s else "o")
            ax2.errorbar(mx, my, xerr=sx, yerr=sy, fmt=marker, color=cmap(i % 20), label=s, capsize=3)
        ax2.set_xlabel("mean perplexity over domains")
        ax2.set_ylabel("worst-domain perplexity")
        ax2.set_title("mean ± std over seeds (lower-left is better)")
        ax2.legend(fontsize=7, loc="best")
        ax2.grid(alpha=0.3)
        # Paired differences to uniform (same seed = same init and batches), mean ± std over seeds.
        paired = [(n, r) for n, r in rows.items() if "delta_mean_vs_uniform" in r and n != REFERENCE]
        y = np.arange(len(paired))
        for offset, key, label, color in ((-0.18, "delta_mean_vs_uniform", "Δ mean ppl", "tab:blue"),
                                          (0.18, "delta_worst_vs_uniform", "Δ worst-domain ppl", "tab:red")):
            vals = [r[key][0] for _, r in paired]
            errs = [r[key][1] for _, r in paired]
            ax3.barh(y + offset, vals, height=0.34, xerr=errs, color=color, alpha=0.7, label=label, capsize=2)
        ax3.axvline(0, color="black", linewidth=0.8)
        ax3.set_yticks(y, [n for n, _ in paired])
        ax3.invert_yaxis()
        ax3.set_xlabel("perplexity minus uniform's, paired by seed (left of 0 is better)")
        ax3.set_title("paired difference to uniform, mean ± std over seeds")
        ax3.legend(fontsize=7)
        ax3.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        path = out_dir / f"mixing_{ds}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ main
def run_benchmark(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run everything, write results.json, table.md and the plots; returns the results document."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets, skipped = available_datasets(cfg)
    for name, why in skipped.items():
        print(f"skipping dataset {name}: {why}", file=sys.stderr)
    cfg = dataclasses.replace(cfg, grad_engine=resolve_engine(cfg.grad_engine))
    start = time.perf_counter()
    records = run_all(cfg, datasets, progress=progress)
    wall = time.perf_counter() - start
    summary = summarize(records, cfg)
    table = markdown_tables(summary, cfg)
    doc = {
        "config": dataclasses.asdict(cfg),
        "tokens_per_run": cfg.tokens_per_run,
        "datasets_skipped": skipped,
        "total_wall_s": wall,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "selected_lr": {f"{r['dataset']}/{r['strategy']}": r["lr"] for r in records if r["phase"] == "final"},
        "summary": summary,
        "runs": sorted(records, key=lambda r: (r["dataset"], r["strategy"], r["phase"], r["lr"], r["seed"])),
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "table.md").write_text(table + "\n")
    doc["plots"] = [str(p) for p in plot(summary, out_dir)]
    doc["table"] = table
    return doc


def parse_args(argv=None) -> tuple[BenchConfig, bool]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CI pipeline check (4 strategies, 6 steps, 1 seed)")
    ap.add_argument("--strategies", help=f"comma-separated (default: all {len(ALL_STRATEGIES)})")
    ap.add_argument("--datasets", help="comma-separated among embedded,redpajama")
    ap.add_argument("--seeds", help="comma-separated reported seeds (default 0,1,2)")
    ap.add_argument("--selection-seed", type=int)
    ap.add_argument("--lrs", help="comma-separated learning rates of the sweep (one value: no sweep)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--graph-lambda", type=float)
    ap.add_argument("--grad-engine", choices=["factored", "opacus"])
    ap.add_argument("--redpajama-dir")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-reference", action="store_true", help="leave out the plain-Trainer reference")
    ap.add_argument("--output-dir")
    ap.add_argument("--resume", action="store_true", help="reuse finished runs with the same settings")
    ap.add_argument("--replot", action="store_true", help="redraw table.md and the plots from results.json, no runs")
    ap.add_argument("--calibrate", action="store_true",
                    help="run the calibration on the selection seed (writes calibration.json) instead of the benchmark")
    ap.add_argument("--no-calibration", action="store_true", help="ignore an existing calibration.json")
    ns = ap.parse_args(argv)
    cfg = quick_config() if ns.quick else BenchConfig()
    over = {}
    split = lambda s, t: [t(x) for x in s.split(",") if x.strip()]  # noqa: E731
    if ns.strategies:
        over["strategies"] = split(ns.strategies, str)
        for s in over["strategies"]:
            strategy_settings(s, cfg)  # fail now on a typo, not in a worker
    for name, conv in (("datasets", str), ("seeds", int), ("lrs", float)):
        if getattr(ns, name):
            over[name] = split(getattr(ns, name), conv)
    for name in ("selection_seed", "steps", "batch_size", "seq_len", "graph_lambda", "grad_engine", "redpajama_dir",
                 "workers", "threads", "output_dir"):
        if getattr(ns, name) is not None:
            over[name] = getattr(ns, name)
    if ns.no_reference:
        over["reference"] = False
    if ns.resume:
        over["resume"] = True
    cfg = dataclasses.replace(cfg, **over)
    if ns.replot:  # the settings of the stored run, not the defaults
        doc = json.loads((Path(cfg.output_dir) / "results.json").read_text())
        cfg = dataclasses.replace(BenchConfig(**doc["config"]), output_dir=cfg.output_dir)
    elif not ns.calibrate and not ns.quick and not ns.no_calibration and "lrs" not in over:
        cfg = apply_calibration(cfg)
    mode = "replot" if ns.replot else "calibrate" if ns.calibrate else "run"
    return cfg, mode


def replot(cfg: BenchConfig) -> dict:
    """Table and plots again from a stored results.json (e.g. after changing the plot)."""
    out_dir = Path(cfg.output_dir)
    doc = json.loads((out_dir / "results.json").read_text())
    doc["table"] = markdown_tables(doc["summary"], cfg)
    (out_dir / "table.md").write_text(doc["table"] + "\n")
    doc["plots"] = [str(p) for p in plot(doc["summary"], out_dir)]
    return doc


def main(argv=None) -> int:
    cfg, mode = parse_args(argv)
    _quiet()
    if mode == "calibrate":
        doc = run_calibration(cfg)
        print()
        print(calibration_table(doc))
        print(f"calibration wall time: {doc['wall_s'] / 60:.1f} min; wrote {cfg.output_dir}/calibration.json")
        return 0
    doc = replot(cfg) if mode == "replot" else run_benchmark(cfg)
    print()
    print(doc["table"])
    print(f"total wall time: {doc['total_wall_s'] / 60:.1f} min on {doc['cpu_count']} CPU cores "
          f"({cfg.workers} workers x {cfg.threads} threads); load average at the end: "
          f"{', '.join(f'{x:.1f}' for x in doc['load_average_at_end'])}")
    print(f"wrote {cfg.output_dir}/results.json, table.md, " + ", ".join(Path(p).name for p in doc["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
