"""The DoGraph model card, and the results it reports (per-domain evaluation, lm-eval-harness scores).

The card is rendered with `huggingface_hub.ModelCard.from_template` from the template whose source of
truth is `model_cards/dograph_model_card.md` at the top of the repository. An installed package (wheel)
has no repository around it, so a byte-identical copy ships as package data in
`hf_dograph/templates/dograph_model_card.md`; `template_path()` prefers the repository file (so edits
show at once in a checkout) and falls back to the packaged copy; a test keeps the two identical.

Everything the card says is read from a run folder (what `save_model` and the CLI write there), so the
same function serves `DoGraphTrainer.create_model_card` (hence `trainer.push_to_hub()`) and
`hf-dograph push OUTPUT_DIR`:

- `dograph_state.json`: settings, weight history, last step (checkpointing.py) → settings table, plots,
  model-vs-human agreement;
- `recipe.yaml`, `domain_names.json`, `per_domain_eval.json` (written by `hf-dograph train`), and
  `lm_eval_results.json` (written by `lm_eval_scores`), each optional;
- `config.json` / `adapter_config.json` and the weights' headers: model type, size, base model.

Metadata: `library_name` (transformers, or peft for an adapter), tags `dograph` and `data-mixing`,
`datasets` (Hub datasets of the recipe), `base_model` when fine-tuned, and a `model-index` holding the
per-domain validation perplexities (plus their mean and worst) and the lm-eval scores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from .jsonfiles import write_json

logger = logging.getLogger(__name__)

ARXIV_ID = "2604.07963"
TEMPLATE_NAME = "dograph_model_card.md"
CARD_MARKER = "<!-- hf_dograph model card"
BASE_TAGS = ["dograph", "data-mixing", "text-generation"]
PER_DOMAIN_FILE = "per_domain_eval.json"
LM_EVAL_FILE = "lm_eval_results.json"
#: The nine lm-eval-harness tasks of the paper (HellaSwag, PiQA, OBQA, COPA, LogiQA, WinoGrande, SciQ,
#: ARC-Easy, Lambada), by their lm-eval task names.
PAPER_TASKS = ("hellaswag", "piqa", "openbookqa", "copa", "logiqa", "winogrande", "sciq", "arc_easy", "lambada_openai")
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"

_PACKAGE_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- where things are
def template_path() -> Path:
    """The card template: the repository's `model_cards/` (source of truth), else the packaged copy."""
    for candidate in (_PACKAGE_DIR.parent / "model_cards" / TEMPLATE_NAME, _PACKAGE_DIR / "templates" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the model card template {TEMPLATE_NAME} is missing from both model_cards/ and hf_dograph/templates/: "
        "reinstall hf_dograph"
    )


def per_domain_perplexity_path() -> Path:
    """Folder of the `evaluate` module shipped in the package: `evaluate.load(str(per_domain_perplexity_path()))`."""
    return _PACKAGE_DIR / "metrics" / "per_domain_perplexity"


# ----------------------------------------------------------------------------- reading a run folder
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None


def _read_recipe(output_dir: Path) -> tuple[str | None, dict | None]:
    """The run's recipe as the card shows it (text) and as parsed (raw, as written: for reading only).

    The card is public: the text is the recipe without credentials and with local paths made public
    (`redaction.public_recipe`), whatever `recipe.yaml` holds (a hand-written or older one may hold both).
    A recipe.yaml that cannot be parsed is left out of the card, with a warning.
    """
    path = output_dir / "recipe.yaml"
    if not path.is_file():
        return None, None
    import yaml

    from .redaction import public_recipe

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        logger.warning("model card: %s is not readable YAML, left out of the card (%s)", path, " ".join(str(err).split()))
        return None, None
    if not isinstance(raw, dict):
        return None, None
    return yaml.safe_dump(public_recipe(raw), sort_keys=False, allow_unicode=True), raw


def count_parameters(output_dir: Path) -> int | None:
    """Parameters in the folder's safetensors files, from their headers only (no weights are read)."""
    files = sorted(output_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as handle:
                (n,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(n))
            total += sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:  # a truncated or foreign file
            logger.warning("model card: cannot read the header of %s (%s): no parameter count", f, err)
            return None
    return total


def human_count(n: int | None) -> str | None:
    if not n:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def normalize_per_domain(result) -> dict | None:
    """Per-domain results as `PerDomainResult.to_dict()` gives them, from that object, its dict, or the CLI's
    `per_domain_eval.json` (which nests it under "per_domain")."""
    if result is None:
        return None
    if hasattr(result, "to_dict"):
        result = result.to_dict()
    if isinstance(result, dict) and "per_domain" in result and "domains" not in result:
        result = result["per_domain"]
    if not isinstance(result, dict) or not result.get("domains"):
        return None
    return result


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


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
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=s["metric"],
                   metric_value=round(100 * float(s["value"]), 2), source_name="lm-evaluation-harness",
                   source_url=LM_EVAL_URL)
        for task, s in scores.items()
    ]


# ----------------------------------------------------------------------------- what the history says
def _num_human_domains(history: list[dict]) -> int:
    ids = [int(d) for e in history for d in e.get("human_share", {})]
    return max(ids) + 1 if ids else 0


def weight_shares(history: list[dict], domain_names: Sequence[str] | None = None) -> list[dict]:
    """Per human domain, averaged over micro-batches: share of the samples and share of DoGraph's weight α."""
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


def _training_from_recipe(raw: dict | None, state: dict | None) -> list[tuple[str, str]]:
    rows = []
    if state and state.get("global_step"):
        rows.append(("optimizer steps", str(state["global_step"])))
    training = (raw or {}).get("training") or {}
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16", "fp16"):
        if key in training:
            rows.append((key, str(training[key])))
    return rows


def _enum_value(x) -> str:
    return str(getattr(x, "value", x))


def training_from_args(args, global_step: int, world_size: int = 1) -> list[tuple[str, str]]:
    """The training table from a trainer's `TrainingArguments`."""
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, world_size)
    rows = [
        ("optimizer steps", str(global_step)),
        ("batch size (sequences per step)", f"{effective} ({args.per_device_train_batch_size} per device × "
                                            f"{args.gradient_accumulation_steps} accumulation"
                                            + (f" × {world_size} processes)" if world_size > 1 else ")")),
        ("learning rate", f"{args.learning_rate:g} ({_enum_value(args.lr_scheduler_type)})"),
        ("warmup steps", str(args.warmup_steps)),
        ("weight decay", f"{args.weight_decay:g}"),
        ("gradient clipping", f"{args.max_grad_norm:g}"),
        ("seed", str(args.seed)),
    ]
    if args.bf16 or args.fp16:
        rows.append(("precision", "bf16" if args.bf16 else "fp16"))
    return rows


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _model_identity(output_dir: Path, recipe_raw: dict | None) -> dict:
    """library (transformers or peft), model type and base model, from the files of the folder."""
    adapter = _read_json(output_dir / "adapter_config.json")
    config = _read_json(output_dir / "config.json") or {}
    info = {"library": "transformers", "model_type": config.get("model_type"), "base_model": None}
    if adapter:
        info["library"] = "peft"
        info["base_model"] = adapter.get("base_model_name_or_path")
        kind = str(adapter.get("peft_type") or "PEFT")
        info["model_type"] = "LoRA adapter" if kind.upper() == "LORA" else f"{kind} adapter"
    model_section = (recipe_raw or {}).get("model") or {}
    if model_section.get("name_or_path") and not model_section.get("from_scratch"):
        info["base_model"] = info["base_model"] or model_section["name_or_path"]
    if not _looks_like_hub_id(info["base_model"]):
        info["base_model"] = None  # a local folder means nothing to a reader of the Hub page
    return info


# ----------------------------------------------------------------------------- the card
def build_model_card(
    output_dir: str | os.PathLike,
    *,
    state: dict | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    per_domain=None,
    lm_eval: dict | None = None,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    training: list[tuple[str, str]] | None = None,
    domain_names: list[str] | None = None,
    template: str | os.PathLike | None = None,
):
    """The DoGraph `ModelCard` of a run folder; arguments override what the folder's files say.

    Plots are referenced if `output_dir/dograph_plots/*.png` exist (see `write_model_card`, which draws them).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .checkpointing import DOGRAPH_STATE_NAME, load_dograph_state
    from .plots import PLOT_FILES, PLOTS_DIR

    out = Path(output_dir)
    if state is None and (out / DOGRAPH_STATE_NAME).is_file():
        state = load_dograph_state(out)
    state = state or {}
    recipe_text, recipe_raw = _read_recipe(out)
    per_domain = normalize_per_domain(per_domain if per_domain is not None else _read_json(out / PER_DOMAIN_FILE))
    lm_eval = lm_eval if lm_eval is not None else _read_json(out / LM_EVAL_FILE)
    domain_names = domain_names or _read_json(out / "domain_names.json")
    if domain_names is None and per_domain:
        domain_names = list(per_domain["domains"])
    identity = _model_identity(out, recipe_raw)
    base_model = base_model or identity["base_model"]
    repo_id = repo_id or model_name or out.resolve().name
    model_name = model_name or repo_id.split("/")[-1]

    data_section = (recipe_raw or {}).get("data") or {}
    if datasets is None and data_section.get("source") == "hub" and data_section.get("name"):
        datasets = [data_section["name"]]
    datasets = [datasets] if isinstance(datasets, str) else datasets
    dataset_type = datasets[0] if datasets else f"{model_name}-validation"
    dataset_name = (datasets[0] if datasets else
                    "hf_dograph embedded corpus" if data_section.get("source") == "embedded" else "validation data")

    eval_results = []
    if per_domain:
        eval_results += per_domain_eval_results(per_domain, dataset_type, f"{dataset_name} (per-domain validation)")
    if lm_eval:
        eval_results += lm_eval_eval_results(lm_eval)
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    if identity["library"] == "peft":
        extra_tags += ["peft", "lora"]
    card_data = ModelCardData(
        library_name=identity["library"],
        tags=BASE_TAGS + [t for t in extra_tags if t not in BASE_TAGS],
        datasets=datasets or None,
        base_model=base_model,
        language=language,
        license=license,
        pipeline_tag="text-generation",
        model_name=model_name,
        eval_results=eval_results or None,
    )

    history = state.get("history") or []
    settings = state.get("settings") or {}
    has_human = any("human_mass" in e for e in history)
    plots = {name: f"{PLOTS_DIR}/{fname}" for name, fname in PLOT_FILES.items() if (out / PLOTS_DIR / fname).is_file()}
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        model_id=model_name,
        repo_id=repo_id,
        arxiv_id=ARXIV_ID,
        model_type=identity["model_type"],
        num_parameters=human_count(count_parameters(out)),
        steps=state.get("global_step"),
        settings=settings,
        training=training if training is not None else _training_from_recipe(recipe_raw, state),
        recipe_yaml=recipe_text.rstrip() if recipe_text else None,
        recipe_name=(recipe_raw or {}).get("name", "recipe"),
        plots=plots,
        weights_caption=(
            "Top: the share of the gradient weight α each human domain received, per optimizer step. "
            if has_human else
            "Top: the domain weights of each step, largest first (model domains are found afresh every step, so a "
            "domain id does not persist from one step to the next). "
        ) + "Bottom: the effective number of domains exp(H(w)) and the number of domains found.",
        agreement=agreement_context(history),
        shares=weight_shares(history, domain_names),
        results=results_context(per_domain) if per_domain else None,
        dataset_name=dataset_name,
        lm_eval=lm_eval_context(lm_eval),
        library=identity["library"],
    )
    # Optional sections leave runs of blank lines behind them: keep at most one. The card is public: a last pass
    # takes out any token that reached its text some other way (`redaction.scrub_text`).
    from .redaction import scrub_text

    return ModelCard(scrub_text(re.sub(r"\n{3,}", "\n\n", str(card))))


def is_dograph_card(path: str | os.PathLike) -> bool:
    """Whether a README.md was written by hf_dograph (so it may be regenerated)."""
    p = Path(path)
    return p.is_file() and CARD_MARKER in p.read_text(encoding="utf-8", errors="replace")


def write_model_card(output_dir: str | os.PathLike, *, state: dict | None = None, plots: bool = True, **kwargs) -> Path:
    """Draw the plots (from `state` or the folder's `dograph_state.json`) and write `README.md`; returns its path."""
    from .checkpointing import DOGRAPH_STATE_NAME, load_dograph_state

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None and (out / DOGRAPH_STATE_NAME).is_file():
        state = load_dograph_state(out)
    if plots and state and state.get("history"):
        from . import plots as plotting

        plotting.write_plots(state, out, domain_names=kwargs.get("domain_names") or plotting.domain_names_from(out))
    card = build_model_card(out, state=state, **kwargs)
    path = out / "README.md"
    card.save(path)
    return path


# ----------------------------------------------------------------------------- per-domain evaluation, lm-eval
def _data_spec(data):
    """A DataSpec from a DataSpec, a dict of its fields, or a recipe name / YAML path (its `data:` section)."""
    from .data import DataSpec

    if isinstance(data, DataSpec):
        return data
    if isinstance(data, dict):
        return DataSpec(**data)
    from .recipes import load_recipe

    return load_recipe(str(data)).data


def eval_command(
    model: str,
    data,
    *,
    tokenizer: str | None = None,
    batch_size: int = 8,
    device: str | None = None,
    json_path: str | os.PathLike | None = None,
    token: str | None = None,
    bare_hub_ids: bool = True,
    label: str | None = None,
) -> tuple[str, dict]:
    """`hf-dograph eval MODEL --data ...`: per-domain validation loss and perplexity of a causal LM.

    model: a folder or a Hub reference (`user/name`, `user/name@revision`, `user/name:subfolder`, `hf://...`;
        with `bare_hub_ids=False`, as on the command line, only `hf://...`: see `hub.locate`).
    data: a `DataSpec`, a dict of its fields, or a recipe name / YAML file whose `data:` section is used;
        its validation split is what gets evaluated (the same split `hf-dograph train` held out).
    tokenizer: a tokenizer spec for `hf_dograph.data.load_tokenizer` (default: the model's own folder).
    label: how the model is named in the table and the JSON (default: `model`).
    Returns (the plain-text table, the JSON-able dict: per domain loss/perplexity/tokens, mean, worst);
    writes the dict to `json_path` when given.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .data import DomainCollator, build_domain_dataset, load_tokenizer
    from .evaluation import evaluate_per_domain
    from .hub import resolve_model

    from .run_folder import model_folder_problem

    model_dir = resolve_model(model, token=token, bare_hub_ids=bare_hub_ids)
    problem = model_folder_problem(model_dir)
    if problem is not None:
        raise problem
    spec = _data_spec(data)
    tok = load_tokenizer(tokenizer or model_dir)
    dataset = build_domain_dataset(spec, tok)
    if len(dataset.validation) == 0:
        raise ValueError("the data has no validation sequences (validation_fraction=0?): nothing to evaluate")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    result = evaluate_per_domain(lm, dataset.validation, DomainCollator.for_tokenizer(tok), dataset.domain_names,
                                 batch_size=batch_size, device=device)
    summary = result.to_dict()
    summary["model"] = str(label or model)
    table = result.to_table(title=str(label or model).rstrip("/").split("/")[-1])
    if json_path is not None:
        write_json(json_path, summary)
    return table, summary


def scores_from_lm_eval(results: dict, tasks: Sequence[str] | None = None) -> dict:
    """{task: {"metric": "acc_norm" | "acc" | ..., "value": fraction}} from `lm_eval.simple_evaluate`'s output:
    acc_norm where the task has it (as the paper), else acc, else its first numeric non-stderr metric."""
    out = {}
    per_task = results.get("results", results)
    for task in tasks or list(per_task):
        metrics = per_task.get(task)
        if not metrics:
            continue
        values = {k.split(",")[0]: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
        for name in ("acc_norm", "acc", *values):
            if name in values:
                out[task] = {"metric": name, "value": float(values[name])}
                break
    return out


def lm_eval_scores(
    checkpoint: str,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    batch_size: int | str = 8,
    device: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    save: bool = True,
    token: str | None = None,
    include_path: str | os.PathLike | None = None,
) -> dict:
    """Run lm-eval-harness tasks (default: the paper's nine) on a checkpoint (folder or Hub reference).

    Needs the optional extra: `pip install "hf_dograph[lm-eval]"`. Returns `scores_from_lm_eval`'s dict and,
    for a local folder with `save`, writes it to `lm_eval_results.json` there, which the card then shows.
    `include_path`: a folder of your own lm-eval task YAMLs (e.g. on local data files, for offline machines),
    whose task names may then appear in `tasks`.
    """
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(
            'lm-eval-harness is not installed; it is an optional extra: pip install "hf_dograph[lm-eval]"'
        ) from err
    from .hub import resolve_model

    path = resolve_model(checkpoint, token=token)
    kwargs = dict(model="hf", model_args=f"pretrained={path}", tasks=list(tasks), batch_size=batch_size, limit=limit)
    if device is not None:
        kwargs["device"] = device
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        kwargs["task_manager"] = TaskManager(include_path=str(include_path))
    results = lm_eval.simple_evaluate(**kwargs)
    scores = scores_from_lm_eval(results, tasks)
    if save and os.path.isdir(checkpoint):
        write_json(Path(checkpoint) / LM_EVAL_FILE, scores)
    return scores


# ----------------------------------------------------------------------------- the trainer side
def _base_model_of(model) -> str | None:
    """The Hub id a model was loaded from, when it was (PEFT: the adapter's base)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        name = getattr(next(iter(peft_config.values())), "base_model_name_or_path", None)
        return name if _looks_like_hub_id(name) else None
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if _looks_like_hub_id(name) else None


class DoGraphCardMixin:
    """`create_model_card` writes the DoGraph card (replacing the Trainer's), so `trainer.push_to_hub()` publishes
    it with the checkpoint; checkpoint pushes (`hub_strategy`) carry the card, plots and DoGraph state too.

    Per-domain results come from `create_model_card(per_domain=...)`, else `trainer.dograph_eval_result` (set it
    after your own evaluation), else `output_dir/per_domain_eval.json`, else an evaluation of `eval_dataset` by
    human domain when it has the domain label column.
    """

    dograph_eval_result = None

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, per_domain=None,
                          lm_eval=None, **kwargs):
        if not self.is_world_process_zero():
            return
        self._write_dograph_card(language=language, license=license, tags=tags, model_name=model_name,
                                 finetuned_from=finetuned_from, dataset=dataset or dataset_tags,
                                 per_domain=per_domain, lm_eval=lm_eval, evaluate=True)

    def _write_dograph_card(self, *, evaluate: bool, finetuned_from=None, dataset=None, per_domain=None, **kwargs):
        from .checkpointing import dograph_state

        out = Path(self.args.output_dir)
        if per_domain is None:
            per_domain = self.dograph_eval_result
        if per_domain is None and not (out / PER_DOMAIN_FILE).is_file() and evaluate:
            per_domain = self.dograph_eval_result = self._dograph_evaluate_per_domain()
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        model = self.accelerator.unwrap_model(self.model)
        return write_model_card(
            out, state=dograph_state(self), repo_id=repo_id, per_domain=per_domain,
            base_model=finetuned_from or _base_model_of(model), datasets=dataset,
            training=training_from_args(self.args, int(self.state.global_step), self.args.world_size), **kwargs,
        )

    def _dograph_evaluate_per_domain(self):
        """Per-domain validation of `eval_dataset` by its human domain column, when it has one; else None."""
        col = self.dograph_settings.domain_label_column
        ds = self.eval_dataset
        names = getattr(ds, "column_names", None)
        if ds is None or isinstance(ds, dict) or names is None or col not in names or "input_ids" not in names:
            return None
        from .evaluation import evaluate_per_domain
        from .plots import domain_names_from

        domain_names = domain_names_from(self.args.output_dir) or [f"domain {d}" for d in range(max(ds[col]) + 1)]
        try:
            return evaluate_per_domain(
                self.accelerator.unwrap_model(self.model), ds, self.data_collator, domain_names,
                batch_size=self.args.per_device_eval_batch_size, domain_key=col,
            )
        except (KeyError, TypeError, ValueError) as err:  # a collator that drops the label, an odd dataset
            logger.warning("model card: no per-domain evaluation (%s)", err)
            return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        pushing = self.is_world_process_zero() and _enum_value(self.args.hub_strategy) != "end"
        busy = (not self.args.hub_always_push and getattr(self, "push_in_progress", None) is not None
                and not self.push_in_progress.is_done())
        if pushing and not busy:
            # The Trainer copies only the weights into output_dir before pushing it: bring DoGraph's state,
            # plots and card along (no evaluation here: it would run at every save).
            from .checkpointing import DOGRAPH_STATE_NAME

            src = Path(checkpoint_folder) / DOGRAPH_STATE_NAME
            if src.is_file():
                shutil.copy(src, Path(self.args.output_dir) / DOGRAPH_STATE_NAME)
            self._write_dograph_card(evaluate=False)
        super()._push_from_checkpoint(checkpoint_folder)
