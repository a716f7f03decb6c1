"""The card's tables and `model-index` entries, computed from the data given (no file is read here).

Per-domain results, lm-eval scores, the weight history and the training arguments each become the rows
that the template (`model_cards/dograph_model_card.md`) lays out, or the `EvalResult`s of the metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..evaluation.lm_harness import LM_EVAL_URL


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def human_count(n: int | None) -> str | None:
    """A parameter count as the card prints it: 124.4M, 1.1B (None for no count)."""
    if not n:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def results_context(per_domain: dict) -> dict:
    """Rows of the card's per-domain table, plus mean and worst."""
    domains = per_domain["domains"]
    rows = [
        {"name": name, "tokens": d.get("tokens", ""), "loss": _fmt(d.get("loss"), ".4f"),
         "perplexity": _fmt(d.get("perplexity"), ".3f")}
        for name, d in domains.items()
    ]
    worst = per_domain.get("worst_domain")
    w = domains.get(worst, {}) if worst is not None else {}
    return {
        "rows": rows,
        "tokens": sum(int(d.get("tokens") or 0) for d in domains.values()),
        "mean_loss": _fmt(per_domain.get("mean_loss"), ".4f"),
        "mean_perplexity": _fmt(per_domain.get("mean_perplexity"), ".3f"),
        "worst_domain": worst,
        "worst_loss": _fmt(w.get("loss"), ".4f"),
        "worst_perplexity": _fmt(w.get("perplexity"), ".3f"),
    }


def per_domain_eval_results(per_domain: dict, dataset_type: str, dataset_name: str) -> list:
    """model-index entries: validation perplexity per domain, then the mean over domains and the worst."""
    from huggingface_hub import EvalResult

    def entry(metric_name: str, value: float) -> EvalResult:
        return EvalResult(
            task_type="text-generation", task_name="Causal language modeling", dataset_type=dataset_type,
            dataset_name=dataset_name, dataset_split="validation", metric_type="perplexity",
            metric_name=metric_name, metric_value=round(float(value), 4),
        )

    out = []
    for name, d in per_domain["domains"].items():
        ppl = d.get("perplexity")
        if ppl is not None and math.isfinite(float(ppl)):  # a domain without validation tokens has no value
            out.append(entry(f"perplexity ({name})", ppl))
    mean = per_domain.get("mean_perplexity")
    if mean is not None and math.isfinite(float(mean)):
        out.append(entry("perplexity (mean over domains)", mean))
    worst = per_domain.get("worst_domain")
    if worst is not None and worst in per_domain["domains"]:
        out.append(entry(f"perplexity (worst domain: {worst})", per_domain["domains"][worst]["perplexity"]))
    return out


def lm_eval_context(scores: dict) -> dict | None:
    """Rows of the lm-eval table: {task: {"metric": ..., "value": fraction}} → percentages and their average."""
    if not scores:
        return None
    rows = [{"task": t, "metric": s["metric"], "value": f"{100 * s['value']:.1f}"} for t, s in scores.items()]
    avg = sum(s["value"] for s in scores.values()) / len(scores)
    return {"rows": rows, "average": f"{100 * avg:.1f}"}


def lm_eval_eval_results(scores: dict) -> list:
    """model-index entries: one per lm-eval task, in percent, citing lm-evaluation-harness."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=s["metric"],
                   metric_value=round(100 * float(s["value"]), 2), source_name="lm-evaluation-harness",
                   source_url=LM_EVAL_URL)
        for task, s in scores.items()
    ]


def _num_human_domains(history: list[dict]) -> int:
    ids = [int(d) for e in history for d in e.get("human_share", {})]
    return max(ids) + 1 if ids else 0


def weight_shares(history: list[dict], domain_names: Sequence[str] | None = None) -> list[dict]:
    """Per human domain, averaged over the history (optimizer steps; micro-batches for per-batch domains): share of
    the samples and share of DoGraph's weight α."""
    entries = [e for e in history if "human_mass" in e]
    n_dom = _num_human_domains(entries)
    if not entries or not n_dom:
        return []
    samples, weight = [0.0] * n_dom, [0.0] * n_dom
    for e in entries:
        for d, v in e["human_share"].items():
            samples[int(d)] += float(v)
        for d, v in e["human_mass"].items():
            weight[int(d)] += float(v)
    rows = []
    for d in range(n_dom):
        s, w = samples[d] / len(entries), weight[d] / len(entries)
        name = domain_names[d] if domain_names is not None and d < len(domain_names) else f"domain {d}"
        rows.append({"name": name, "samples": s, "weight": w, "ratio": f"{w / s:.2f}" if s > 0 else "-"})
    return rows


def agreement_context(history: list[dict]) -> dict | None:
    """Mean and last NMI between model and human domains (DoGraphCheckpointMixin adds `nmi` to entries)."""
    values = [float(e["nmi"]) for e in history if "nmi" in e]
    if not values:
        return None
    return {"mean_nmi": sum(values) / len(values), "last_nmi": values[-1], "micro_batches": len(values)}


def training_from_recipe(raw: dict | None, state: dict | None) -> list[tuple[str, str]]:
    """The training table from a recipe's `training:` section (and the steps the state counted)."""
    rows = []
    if state and state.get("global_step"):
        rows.append(("optimizer steps", str(state["global_step"])))
    training = (raw or {}).get("training") or {}
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16", "fp16"):
        if key in training:
            rows.append((key, str(training[key])))
    return rows


def enum_value(x) -> str:
    """An enum's value (`IntervalStrategy.STEPS` -> "steps"), anything else as text."""
    return str(getattr(x, "value", x))


def training_from_args(args, global_step: int, world_size: int = 1) -> list[tuple[str, str]]:
    """The training table from a trainer's `TrainingArguments`."""
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, world_size)
    rows = [
        ("optimizer steps", str(global_step)),
        ("batch size (sequences per step)", f"{effective} ({args.per_device_train_batch_size} per device × "
                                            f"{args.gradient_accumulation_steps} accumulation"
                                            + (f" × {world_size} processes)" if world_size > 1 else ")")),
        ("learning rate", f"{args.learning_rate:g} ({enum_value(args.lr_scheduler_type)})"),
        ("warmup steps", str(args.warmup_steps)),
        ("weight decay", f"{args.weight_decay:g}"),
        ("gradient clipping", f"{args.max_grad_norm:g}"),
        ("seed", str(args.seed)),
    ]
    if args.bf16 or args.fp16:
        rows.append(("precision", "bf16" if args.bf16 else "fp16"))
    return rows
