"""The DoGraph model card rendered: from `RunFacts` (and what the caller knows better) to a `ModelCard`.

The card is rendered with `huggingface_hub.ModelCard.from_template` from the template whose source of
truth is `model_cards/dograph_model_card.md` at the top of the repository. An installed package (wheel)
has no repository around it, so a byte-identical copy ships as package data in
`hf_dograph/templates/dograph_model_card.md`; `template_path()` prefers the repository file (so edits
show at once in a checkout) and falls back to the packaged copy; a test keeps the two identical.

Metadata: `library_name` (transformers, or peft for an adapter), tags `dograph` and `data-mixing`,
`datasets` (Hub datasets of the recipe), `base_model` when fine-tuned, and a `model-index` holding the
per-domain validation perplexities (plus their mean and worst) and the lm-eval scores.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import plots as plotting
from ..redaction import scrub_text
from ..state_file import DOGRAPH_STATE_NAME, load_dograph_state
from .facts import RunFacts, read_run_facts
from .sections import (
    agreement_context,
    human_count,
    lm_eval_context,
    lm_eval_eval_results,
    per_domain_eval_results,
    results_context,
    training_from_recipe,
    weight_shares,
)

ARXIV_ID = "2604.07963"
TEMPLATE_NAME = "dograph_model_card.md"
CARD_MARKER = "<!-- hf_dograph model card"
BASE_TAGS = ["dograph", "data-mixing", "text-generation"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def template_path() -> Path:
    """The card template: the repository's `model_cards/` (source of truth), else the packaged copy."""
    for candidate in (_PACKAGE_DIR.parent / "model_cards" / TEMPLATE_NAME, _PACKAGE_DIR / "templates" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the model card template {TEMPLATE_NAME} is missing from both model_cards/ and hf_dograph/templates/: "
        "reinstall hf_dograph"
    )


def render_model_card(
    facts: RunFacts,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    training: list[tuple[str, str]] | None = None,
    template: str | os.PathLike | None = None,
):
    """The DoGraph `ModelCard` of a run, from its facts; the arguments override what the facts say
    (`repo_id` defaults to the folder's name, `training` to the recipe's `training:` section)."""
    from huggingface_hub import ModelCard, ModelCardData

    state, identity, per_domain, recipe_raw = facts.state, facts.identity, facts.per_domain, facts.recipe_raw
    base_model = base_model or identity["base_model"]
    repo_id = repo_id or model_name or facts.folder_name
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
    if facts.lm_eval:
        eval_results += lm_eval_eval_results(facts.lm_eval)
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
    has_human = any("human_mass" in e for e in history)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        model_id=model_name,
        repo_id=repo_id,
        arxiv_id=ARXIV_ID,
        model_type=identity["model_type"],
        num_parameters=human_count(facts.num_parameters),
        steps=state.get("global_step"),
        settings=state.get("settings") or {},
        training=training if training is not None else training_from_recipe(recipe_raw, state),
        recipe_yaml=facts.recipe_text.rstrip() if facts.recipe_text else None,
        recipe_name=(recipe_raw or {}).get("name", "recipe"),
        plots=facts.plots,
        weights_caption=_weights_caption(history, has_human),
        agreement=agreement_context(history),
        shares=weight_shares(history, facts.domain_names),
        results=results_context(per_domain) if per_domain else None,
        dataset_name=dataset_name,
        lm_eval=lm_eval_context(facts.lm_eval),
        library=identity["library"],
    )
    # Optional sections leave runs of blank lines behind them: keep at most one. The card is public: a last pass
    # takes out any token that reached its text some other way (`redaction.scrub_text`).
    return ModelCard(scrub_text(re.sub(r"\n{3,}", "\n\n", str(card))))


def _weights_caption(history: list[dict], has_human: bool) -> str:
    """What the weight-history figure (`plots.domain_weights_figure`) shows for this run's domain mode."""
    if any(e.get("persistent") for e in history):
        return ("Top: the weight of each persistent model-perceived domain (smoothed; domain j keeps its identity "
                "across refits), uniform during the warm-up. "
                + ("Middle: the weight each human domain received relative to uniform mixing (1 = the Trainer's). "
                   if has_human else "")
                + "Bottom: the effective sample size of the step's weights relative to its samples, and the "
                  "effective number of domains exp(H(w)) / m.")
    return ((
        "Top: the share of the gradient weight α each human domain received, per optimizer step. "
        if has_human else
        "Top: the domain weights of each step, largest first (model domains are found afresh every step, so a "
        "domain id does not persist from one step to the next). "
    ) + "Bottom: the effective number of domains exp(H(w)) and the number of domains found.")


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
    facts = read_run_facts(output_dir, state=state, per_domain=per_domain, lm_eval=lm_eval, domain_names=domain_names)
    return render_model_card(facts, repo_id=repo_id, model_name=model_name, base_model=base_model, datasets=datasets,
                             language=language, license=license, tags=tags, training=training, template=template)


def is_dograph_card(path: str | os.PathLike) -> bool:
    """Whether a README.md was written by hf_dograph (so it may be regenerated)."""
    p = Path(path)
    return p.is_file() and CARD_MARKER in p.read_text(encoding="utf-8", errors="replace")


def write_model_card(output_dir: str | os.PathLike, *, state: dict | None = None, plots: bool = True, **kwargs) -> Path:
    """Draw the plots (from `state` or the folder's `dograph_state.json`) and write `README.md`; returns its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None and (out / DOGRAPH_STATE_NAME).is_file():
        state = load_dograph_state(out)
    kwargs["domain_names"] = kwargs.get("domain_names") or plotting.domain_names_from(out)  # read once, for both
    if plots and state and state.get("history"):
        plotting.write_plots(state, out, domain_names=kwargs["domain_names"])
    card = build_model_card(out, state=state, **kwargs)
    path = out / "README.md"
    card.save(path)
    return path
