"""The `hf-dograph` command: train from a YAML recipe, compare with uniform mixing, evaluate per domain.

    hf-dograph train                       # the embedded default: tiny GPT-2, embedded corpus, ~2 min on CPU
    hf-dograph train gpt2-small-slimpajama --set training.max_steps=1000
    hf-dograph train recipes/tiny.yaml --compare-uniform
    hf-dograph train tinyllama-1.1b-pile --smoke        # 2 steps, tiny dims, embedded corpus
    hf-dograph eval outputs/tiny --data tiny            # per-domain loss/perplexity of a model
    hf-dograph push outputs/tiny --repo-id USER/NAME    # weights, tokenizer, DoGraph card and state
    hf-dograph list | show RECIPE

Runs unchanged under `accelerate launch` and `torchrun`: the Trainer reads the launcher's
environment; tables are printed and files written by the main process only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .data.hub import HubAccessError
from .hub import HubReferenceError
from .data.spec import DataError
from .recipes import DEFAULT_RECIPE, SMOKE_HELP, RecipeError

logger = logging.getLogger("hf_dograph.cli")


def _is_main_process() -> bool:
    """Rank 0 (or no launcher), from the launcher's environment: usable before the Trainer exists."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _say(text: str = "") -> None:
    if _is_main_process():
        print(text, flush=True)


def default_output_dir(recipe, smoke: bool) -> Path:
    """outputs/<name> in the working directory; for --smoke a fixed folder under the system temp dir
    (the same path in every process of a multi-process run)."""
    if smoke:
        return Path(tempfile.gettempdir()) / "hf-dograph-smoke" / recipe.name
    return Path(recipe.training.get("output_dir") or Path("outputs") / recipe.name)


# ----------------------------------------------------------------------------- what DoGraph changed
def dograph_weight_shares(history: list[dict], num_domains: int) -> dict | None:
    """Per human domain, over all micro-batches: its share of the samples (what uniform mixing
    gives it) and its share of DoGraph's weight α. None when the batches carried no labels."""
    entries = [h for h in history if "human_mass" in h]
    if not entries:
        return None
    data = [0.0] * num_domains
    weight = [0.0] * num_domains
    for h in entries:
        for d, v in h["human_share"].items():
            data[int(d)] += v
        for d, v in h["human_mass"].items():
            weight[int(d)] += v
    n = len(entries)
    return {"data_share": [x / n for x in data], "dograph_weight": [x / n for x in weight], "micro_batches": n}


def weights_table(shares: dict, names: list[str]) -> str:
    width = max(len("domain"), *(len(n) for n in names))
    lines = [
        f"{'domain':<{width}} | {'share of samples':>16} | {'share of DoGraph weight':>23} | {'ratio':>6}",
        "-" * (width + 56),
    ]
    for i, name in enumerate(names):
        data, weight = shares["data_share"][i], shares["dograph_weight"][i]
        ratio = f"{weight / data:6.2f}" if data > 0 else "     -"
        lines.append(f"{name:<{width}} | {data:>16.3f} | {weight:>23.3f} | {ratio}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training
def save_checkpoint(trainer, recipe, tokenizer, output_dir: Path) -> None:
    """Write a checkpoint that `AutoModelForCausalLM.from_pretrained(output_dir)` loads.

    LoRA on a Hub model: the adapter (peft's format; from_pretrained fetches the base it names).
    LoRA on a model built from `model.config`: no base exists anywhere to name, so the adapter is
    merged into the weights and the whole model is saved.
    """
    model = trainer.model
    if recipe.model.lora and recipe.model.name_or_path is None and hasattr(model, "merge_and_unload"):
        if trainer.is_world_process_zero():
            merged = model.merge_and_unload()
            merged.save_pretrained(str(output_dir))
            tokenizer.save_pretrained(str(output_dir))
            trainer.model = merged  # the evaluation that follows sees the same weights
        return
    trainer.save_model(str(output_dir))  # every rank calls it; the Trainer writes on the main process


def _train_one(recipe, data, tokenizer, output_dir: Path, uniform: bool, resume_from_checkpoint=None):
    """Train one model on `data`; returns (trainer, per-domain result, weight shares or None)."""
    from transformers import Trainer, set_seed

    from .data import DomainCollator
    from .evaluation import evaluate_per_domain
    from .recipes import build_model, build_training_args, uniform_twin

    run = uniform_twin(recipe) if uniform else recipe
    args = build_training_args(run, output_dir)
    set_seed(args.seed)  # the same initial weights for a DoGraph run and its uniform twin
    model = build_model(run, tokenizer)
    domain_key = run.settings().domain_label_column if run.trainer == "dograph" else "domain"
    eval_collator = DomainCollator.for_tokenizer(tokenizer, keep_domain=True, domain_key="domain")
    if run.trainer == "dograph":
        from . import DoGraphTrainer

        collator = DomainCollator.for_tokenizer(tokenizer, keep_domain=True, domain_key=domain_key, feature_key="domain")
        trainer_cls = DoGraphTrainer
    else:
        collator = DomainCollator.for_tokenizer(tokenizer, keep_domain=False)
        trainer_cls = Trainer
    eval_dataset = data.validation
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=eval_dataset if len(eval_dataset) else None,
        data_collator=collator,
        processing_class=tokenizer,
    )
    _say(f"\n== training {run.name} ({'DoGraphTrainer' if run.trainer == 'dograph' else 'Trainer, uniform mixing'})"
         f" -> {output_dir}")
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    save_checkpoint(trainer, run, tokenizer, output_dir)
    result = evaluate_per_domain(
        trainer.model, data.validation, eval_collator, data.domain_names,
        batch_size=int(args.per_device_eval_batch_size),
    )
    shares = None
    if run.trainer == "dograph" and run.settings().mixing_strategy == "dograph":
        shares = dograph_weight_shares(getattr(trainer, "dograph_history", []) or [], data.num_domains)
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        data.save_domain_names(output_dir)
        (output_dir / "recipe.yaml").write_text(run.to_yaml(), encoding="utf-8")
        summary = {"per_domain": result.to_dict(), "data": data.stats.to_dict()}
        if shares is not None:
            summary["dograph_weight_shares"] = {
                name: {"share_of_samples": shares["data_share"][i], "share_of_weight": shares["dograph_weight"][i]}
                for i, name in enumerate(data.domain_names)
            }
        (output_dir / "per_domain_eval.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if run.trainer == "dograph":
        # The DoGraph model card (README.md) reads the files just written; main process only.
        trainer.dograph_eval_result = result
        try:
            trainer.create_model_card()
        except Exception as err:  # a card is a courtesy: never lose a finished run over it
            logger.warning("no model card written: %s", err)
    if args.push_to_hub:
        trainer.push_to_hub()  # every rank calls it; the Trainer uploads from the main process
    return trainer, result, shares


def run_train(recipe, output_dir: Path, compare_uniform: bool = False, resume_from_checkpoint: str | None = None) -> dict:
    """Everything `hf-dograph train` does after parsing; returns the per-domain results by run label.

    `resume_from_checkpoint` (or the recipe's training.resume_from_checkpoint): a checkpoint folder, or a
    Hub reference USER/NAME[@REV][:SUBFOLDER], resumed by the first run (not by the uniform twin).
    """
    from .data import build_domain_dataset, load_tokenizer
    from .evaluation import compare_table
    from .recipes import build_training_args, check_resources

    check_resources(recipe)  # a Hub model/tokenizer/dataset that cannot be had fails here, not mid-run
    resume = resume_from_checkpoint or recipe.training.get("resume_from_checkpoint")
    if resume:
        from .hub import resolve_checkpoint

        resume = resolve_checkpoint(str(resume))  # a folder as is; a Hub reference is downloaded
    start = time.time()
    tokenizer = load_tokenizer(recipe.tokenizer.name, model_max_length=recipe.tokenizer.model_max_length or recipe.data.seq_len)
    args = build_training_args(recipe, output_dir)
    with args.main_process_first(desc="building the dataset"):  # download/prepare once per machine
        data = build_domain_dataset(recipe.data, tokenizer)
    if len(data.validation) == 0:
        _say("warning: no validation sequences (data.validation_fraction=0?): no per-domain table at the end")
    _say(f"recipe {recipe.name}: {data.num_domains} domains, sequences of {data.seq_len} tokens "
         f"(tokenizer {recipe.tokenizer.name}, {len(tokenizer)} tokens)")
    _say(data.summary())

    results = {}
    label = "DoGraph" if recipe.trainer == "dograph" else "uniform"
    _, results[label], shares = _train_one(
        recipe, data, tokenizer, output_dir, uniform=recipe.trainer == "uniform", resume_from_checkpoint=resume
    )
    if compare_uniform and recipe.trainer == "dograph":
        _, results["uniform"], _ = _train_one(recipe, data, tokenizer, output_dir / "uniform", uniform=True)

    if len(data.validation):
        _say(f"\n== per-domain validation loss / perplexity ({len(data.validation)} sequences)")
        _say(compare_table(results))
    if shares is not None:
        _say("\n== what DoGraph changed: each human domain's share of the samples (= its weight under uniform "
             "mixing) and of DoGraph's gradient weight, averaged over training micro-batches")
        _say(weights_table(shares, data.domain_names))
    _say(f"\nsaved: {output_dir} (AutoModelForCausalLM.from_pretrained loads it; tokenizer, domain_names.json, "
         f"recipe.yaml, per_domain_eval.json beside it) in {time.time() - start:.0f} s")
    return results


# ----------------------------------------------------------------------------- commands
def cmd_train(ns) -> int:
    from .recipes import load_recipe

    overrides = list(ns.set)
    if ns.push_to_hub:
        overrides.append("training.push_to_hub=true")
    if ns.hub_model_id:
        overrides.append(f"training.hub_model_id={ns.hub_model_id}")
    recipe = load_recipe(ns.recipe, overrides, smoke=ns.smoke)
    output_dir = Path(ns.output_dir) if ns.output_dir else default_output_dir(recipe, ns.smoke)
    if ns.compare_uniform and recipe.trainer != "dograph":
        raise RecipeError(f"--compare-uniform needs a DoGraph recipe; {recipe.name!r} is already uniform")
    from .distributed import shutdown

    run_train(recipe, output_dir, compare_uniform=ns.compare_uniform, resume_from_checkpoint=ns.resume_from_checkpoint)
    shutdown()  # under torchrun/accelerate: every rank leaves together
    return 0


def cmd_list(ns) -> int:
    import yaml

    from .recipes import available_recipes, embedded_default_raw

    for name, path in available_recipes().items():
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path else embedded_default_raw()
        print(f"{name:<32} {raw.get('description', '')}")
    return 0


def cmd_show(ns) -> int:
    from .recipes import load_recipe

    recipe = load_recipe(ns.recipe, ns.set, smoke=ns.smoke)
    print(recipe.to_yaml(), end="")
    return 0


def cmd_eval(ns) -> int:
    """Per-domain validation loss/perplexity of a model (folder or Hub reference) on a recipe's validation split."""
    from .card import eval_command

    data = ns.data
    if data is None:
        saved = Path(ns.model) / "recipe.yaml"
        if not saved.is_file():
            raise RecipeError(f"--data is missing: {ns.model} has no recipe.yaml; name a recipe (e.g. --data tiny)")
        data = str(saved)
    table, summary = eval_command(
        ns.model, data, tokenizer=ns.tokenizer, batch_size=ns.batch_size, device=ns.device, json_path=ns.json,
        token=ns.token,
    )
    print(table)
    if ns.json:
        print(f"\nsaved: {ns.json}")
    return 0


def cmd_push(ns) -> int:
    """Upload a run folder (weights, tokenizer, DoGraph card and state, plots) to the Hub."""
    from .hub import push_output_dir

    info = push_output_dir(
        ns.output_dir, ns.repo_id, private=ns.private or None, token=ns.token, revision=ns.revision,
        include_checkpoints=ns.include_checkpoints, create_pr=ns.create_pr,
    )
    print(f"pushed {ns.output_dir} to {getattr(info, 'commit_url', None) or ns.repo_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dograph",
        description="DoGraph data mixing for the Hugging Face Trainer, from YAML recipes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Recipes: `hf-dograph list`. Any field: --set section.key=value (e.g. training.max_steps=100).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_options(p):
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE",
            help="override a recipe field, e.g. --set training.learning_rate=3e-4 --set dograph.num_domains=7 "
            "--set model.config.n_layer=4 (values are YAML; repeatable)",
        )
        p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)

    train = sub.add_parser(
        "train", help="train a model from a recipe (default: the embedded tiny recipe)",
        description="Train from a recipe. With no recipe: the embedded default 'tiny' (a tiny GPT-2 from scratch "
        "on the embedded corpus, a few minutes on CPU), ending with a per-domain validation table.",
    )
    train.add_argument("recipe", nargs="?", default=None,
                       help=f"a recipe name (see `hf-dograph list`) or a YAML file (default: {DEFAULT_RECIPE})")
    train.add_argument("--output-dir", default=None,
                       help="where the checkpoint goes (default: outputs/<recipe name>)")
    train.add_argument("--compare-uniform", action="store_true",
                       help="also train the recipe's uniform twin (plain Trainer, same data, seed and "
                       "hyper-parameters) into OUTPUT_DIR/uniform, and print both side by side")
    train.add_argument("--resume-from-checkpoint", default=None, metavar="PATH_OR_REF",
                       help="resume a run: a checkpoint folder or a Hub reference USER/NAME[@REV][:SUBFOLDER]")
    train.add_argument("--push-to-hub", action="store_true",
                       help="upload the result with its DoGraph model card (training.push_to_hub=true; hub_* fields apply)")
    train.add_argument("--hub-model-id", default=None, metavar="USER/NAME", help="training.hub_model_id")
    recipe_options(train)
    train.set_defaults(func=cmd_train)

    lst = sub.add_parser("list", help="list the available recipes")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="print a recipe as it will run (after extends, --set, --smoke)")
    show.add_argument("recipe", nargs="?", default=None)
    recipe_options(show)
    show.set_defaults(func=cmd_show)

    ev = sub.add_parser("eval", help="per-domain validation loss/perplexity (mean and worst) of a model")
    ev.add_argument("model", help="a model folder (e.g. outputs/tiny) or a Hub reference USER/NAME[@REV][:SUBFOLDER]")
    ev.add_argument("--data", default=None,
                    help="a recipe name or YAML file whose data section (and validation split) is used "
                    "(default: MODEL/recipe.yaml, as `hf-dograph train` saves it)")
    ev.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the model's own)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default=None, help="cuda, cpu... (default: cuda when available)")
    ev.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    ev.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    ev.set_defaults(func=cmd_eval)

    push = sub.add_parser("push", help="upload a run folder with its DoGraph model card to the Hub")
    push.add_argument("output_dir")
    push.add_argument("--repo-id", required=True, metavar="USER/NAME")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.add_argument("--revision", default=None)
    push.add_argument("--include-checkpoints", action="store_true")
    push.add_argument("--create-pr", action="store_true")
    push.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (RecipeError, DataError, HubAccessError, HubReferenceError) as err:
        print(f"hf-dograph: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m hf_dograph.cli
    sys.exit(main())
