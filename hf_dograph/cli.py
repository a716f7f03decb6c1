"""The `hf-dograph` command: train from a YAML recipe, compare with uniform mixing, evaluate per domain.

    hf-dograph train                       # the embedded default: tiny GPT-2, embedded corpus, ~2 min on CPU
    hf-dograph train gpt2-small-slimpajama --set training.max_steps=1000
    hf-dograph train recipes/tiny.yaml --compare-uniform
    hf-dograph train tinyllama-1.1b-pile --smoke        # 2 steps, tiny dims, embedded corpus
    hf-dograph train --resume-from-checkpoint outputs/tiny/checkpoint-100   # or hf://USER/NAME:last-checkpoint
    hf-dograph train --overwrite-output-dir             # train over a finished run in outputs/tiny
    hf-dograph eval outputs/tiny --data tiny            # per-domain loss/perplexity of a model
    hf-dograph push outputs/tiny --repo-id USER/NAME    # weights, tokenizer, DoGraph card and state
    hf-dograph list | show RECIPE

Runs unchanged under `accelerate launch` and `torchrun`: the Trainer reads the launcher's
environment; tables are printed and files written by the main process only.

A run owns its output folder (`run_folder`): a folder another run is writing is refused (its lock file
names the owner), and so is one holding a finished or stopped run unless --overwrite-output-dir or
--resume-from-checkpoint says what to do with it. Errors about the user's input (recipes, data files,
checkpoints, folders) are printed as one line naming the file, the line and the fix, and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .data.hub import HubAccessError
from .data.spec import DataError
from .errors import InputFileError, NonFiniteTrainingError, one_line
from .folder_lock import FolderLockedError
from .hub import HubReferenceError
from .recipes import DEFAULT_RECIPE, SMOKE_HELP, RecipeError
from .run_folder import RunFolderError

#: Errors whose message is the whole story (what, where, the fix): printed as one line, no traceback.
USER_ERRORS = (RecipeError, DataError, HubAccessError, HubReferenceError, InputFileError, RunFolderError,
               FolderLockedError, NonFiniteTrainingError)

logger = logging.getLogger("hf_dograph.cli")


def _is_main_process() -> bool:
    """Rank 0 (or no launcher), from the launcher's environment: usable before the Trainer exists."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _say(text: str = "") -> None:
    if _is_main_process():
        print(text, flush=True)


def _launch_id() -> str | None:
    """An id shared by the processes of one launched run (torchrun, accelerate), None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return os.environ.get("TORCHELASTIC_RUN_ID") or (
        f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}")


def default_output_dir(recipe, smoke: bool) -> Path:
    """outputs/<name> in the working directory. For --smoke a fresh private folder (mode 0700) under the
    system temp dir: never a fixed path another user could have planted a symlink at. The processes of a
    launched run share one (named after the launch, created by the first, checked by all)."""
    if smoke:
        from .run_folder import private_temp_dir

        return private_temp_dir(f"hf-dograph-smoke-{recipe.name}-", shared_key=_launch_id())
    return Path(recipe.training.get("output_dir") or Path("outputs") / recipe.name)


# ----------------------------------------------------------------------------- what DoGraph changed
def dograph_weight_shares(history: list[dict], num_domains: int) -> dict | None:
    """Per human domain, over all history entries (optimizer steps; micro-batches for per-batch domains): its
    share of the samples (what uniform mixing gives it) and its share of DoGraph's weight α. None when the
    batches carried no labels."""
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


def comparison_twin(recipe):
    """The uniform twin trained beside a DoGraph run (--compare-uniform): a reference for the table, never
    published (the Hub repo is the DoGraph model's), so its push_to_hub is off."""
    from .recipes import parse_recipe, uniform_twin

    twin = uniform_twin(recipe)
    if not twin.training.get("push_to_hub"):
        return twin
    raw = dict(twin.raw, training={**(twin.raw.get("training") or {}), "push_to_hub": False})
    return parse_recipe(raw, twin.name, twin.path)


def _train_one(recipe, data, tokenizer, output_dir: Path, uniform: bool, resume_from_checkpoint=None):
    """Train one model on `data`; returns (trainer, per-domain result, weight shares or None)."""
    from transformers import Trainer, set_seed

    from .data import DomainCollator
    from .evaluation import evaluate_per_domain
    from .jsonfiles import write_json
    from .recipes import build_model, build_training_args
    from .redaction import pickle_without_credentials

    run = comparison_twin(recipe) if uniform and recipe.trainer == "dograph" else recipe
    # training_args.bin (a pickle of these arguments, in the run folder and each checkpoint) holds no token
    args = pickle_without_credentials(build_training_args(run, output_dir))
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
        (output_dir / "recipe.yaml").write_text(run.to_yaml(for_file=True), encoding="utf-8")
        summary = {"per_domain": result.to_dict(), "data": data.stats.to_dict()}
        if shares is not None:
            summary["dograph_weight_shares"] = {
                name: {"share_of_samples": shares["data_share"][i], "share_of_weight": shares["dograph_weight"][i]}
                for i, name in enumerate(data.domain_names)
            }
        write_json(output_dir / "per_domain_eval.json", summary)  # strict JSON: a NaN loss is written null
    if run.trainer == "dograph":
        # The DoGraph model card (README.md) reads the files just written; main process only.
        trainer.dograph_eval_result = result
        try:
            trainer.create_model_card()
        except Exception as err:  # a card is a courtesy: never lose a finished run over it
            logger.warning("no model card written: %s", err)
    return trainer, result, shares


def push_run(trainer, output_dir: Path) -> None:
    """Publish a finished run: its folder less checkpoints, private files and nested runs (the uniform twin
    of --compare-uniform: `publish.push_ignore_patterns`), to the repo the Trainer created (hub_* arguments)."""
    from .publish import push_output_dir

    finish = getattr(trainer, "_finish_current_push", None)
    if callable(finish):  # checkpoint pushes still uploading (hub_strategy): let them land first
        finish()
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    if not (output_dir / "README.md").is_file():
        trainer.create_model_card()  # a uniform run: the Trainer's own card
    created = getattr(trainer, "hub_model_id", None)  # the Trainer created the repo when it started
    repo_id = created or args.hub_model_id or output_dir.resolve().name
    info = push_output_dir(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo,
                           revision=args.hub_revision, create_card=False, commit_message="End of training",
                           create_repo=created is None)
    _say(f"pushed {output_dir} to {getattr(info, 'commit_url', None) or repo_id}")


def run_train(recipe, output_dir: Path, compare_uniform: bool = False, resume_from_checkpoint: str | None = None) -> dict:
    """Everything `hf-dograph train` does after parsing; returns the per-domain results by run label.

    `resume_from_checkpoint` (or the recipe's training.resume_from_checkpoint): a complete checkpoint folder, or
    a Hub reference hf://USER/NAME[@REV][:SUBFOLDER], resumed by the first run (not by the uniform twin).
    With `training.push_to_hub`, the DoGraph run is pushed last (`push_run`), without the uniform twin.
    """
    from .data import build_domain_dataset, load_tokenizer
    from .evaluation import compare_table
    from .recipes import build_training_args, check_resources

    check_resources(recipe)  # a Hub model/tokenizer/dataset that cannot be had fails here, not mid-run
    resume = resume_from_checkpoint or recipe.training.get("resume_from_checkpoint")
    if resume:
        from .run_folder import resume_checkpoint

        # A folder as is (it must be a complete checkpoint); hf://USER/NAME... is downloaded. A bare USER/NAME
        # that is not a folder is an error here, not a Hub lookup (a mistyped path must not fetch a stranger's repo).
        resume = resume_checkpoint(output_dir, str(resume), bare_hub_ids=False, require_dograph_state=False)
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
    trainer, results[label], shares = _train_one(
        recipe, data, tokenizer, output_dir, uniform=recipe.trainer == "uniform", resume_from_checkpoint=resume
    )
    if compare_uniform and recipe.trainer == "dograph":
        _, results["uniform"], _ = _train_one(recipe, data, tokenizer, output_dir / "uniform", uniform=True)
    if trainer.args.push_to_hub:  # last: the card, tables and the twin are all written by now
        push_run(trainer, output_dir)

    if len(data.validation):
        _say(f"\n== per-domain validation loss / perplexity ({len(data.validation)} sequences)")
        _say(compare_table(results))
    if shares is not None:
        _say("\n== what DoGraph changed: each human domain's share of the samples (= its weight under uniform "
             "mixing) and of DoGraph's gradient weight, averaged over training steps")
        _say(weights_table(shares, data.domain_names))
    _say(f"\nsaved: {output_dir} (AutoModelForCausalLM.from_pretrained loads it; tokenizer, domain_names.json, "
         f"recipe.yaml, per_domain_eval.json beside it) in {time.time() - start:.0f} s")
    return results


# ----------------------------------------------------------------------------- commands
@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (a scheduler stopping the job, torchrun stopping its workers) ends the run like Ctrl-C does:
    through `finally` blocks, so the output folder's lock is released. Left alone if someone handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cmd_train(ns) -> int:
    from .recipes import load_recipe
    from .run_folder import claim_output_dir

    overrides = list(ns.set)
    if ns.push_to_hub:
        overrides.append("training.push_to_hub=true")
    if ns.hub_model_id:
        overrides.append(f"training.hub_model_id={ns.hub_model_id}")
    recipe = load_recipe(ns.recipe, overrides, smoke=ns.smoke)
    if ns.compare_uniform and recipe.trainer != "dograph":
        raise RecipeError(f"--compare-uniform needs a DoGraph recipe; {recipe.name!r} is already uniform")
    output_dir = Path(ns.output_dir) if ns.output_dir else default_output_dir(recipe, ns.smoke)
    resume = ns.resume_from_checkpoint or recipe.training.get("resume_from_checkpoint")
    from .distributed import shutdown

    # The folder is ours for the whole command (both runs, the card, the push): refused if another run holds
    # it (alive: its lock; finished: its files, unless --overwrite-output-dir or a resume). The main process
    # holds the lock for all the processes of a launched run.
    with _sigterm_exits(), claim_output_dir(output_dir, overwrite=ns.overwrite_output_dir, resume=bool(resume),
                                            lock=_is_main_process(), how="cli"):
        run_train(recipe, output_dir, compare_uniform=ns.compare_uniform,
                  resume_from_checkpoint=ns.resume_from_checkpoint)
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
    from .distributed import launch_config_text

    print(launch_config_text(None if ns.smoke else ns.recipe), end="")  # its sharded launch, if any (as comments)
    return 0


def cmd_eval(ns) -> int:
    """Per-domain validation loss/perplexity of a model (folder or Hub reference) on a recipe's validation split."""
    from .evaluation import eval_command
    from .hub import resolve_model
    from .run_folder import model_folder_problem

    # Which model, first: a missing or model-less folder is the error to report, not a missing --data.
    # On the command line a Hub model is written hf://USER/NAME (a bare USER/NAME must be a folder).
    model_dir = resolve_model(ns.model, token=ns.token, bare_hub_ids=False)
    problem = model_folder_problem(model_dir)
    if problem is not None:
        raise problem
    data = ns.data
    if data is None:
        saved = Path(model_dir) / "recipe.yaml"
        if not saved.is_file():
            raise RecipeError(f"--data is missing: {ns.model} has no recipe.yaml; name a recipe (e.g. --data tiny)")
        data = str(saved)
    table, summary = eval_command(
        model_dir, data, tokenizer=ns.tokenizer, batch_size=ns.batch_size, device=ns.device, json_path=ns.json,
        token=ns.token, label=ns.model,
    )
    print(table)
    if ns.json:
        print(f"\nsaved: {ns.json}")
    return 0


def cmd_push(ns) -> int:
    """Upload a run folder (weights, tokenizer, DoGraph card and state, plots) to the Hub."""
    from .folder_lock import FolderLock
    from .publish import push_output_dir

    if not Path(ns.output_dir).is_dir():
        raise InputFileError(ns.output_dir, "no such folder", "push a run's output folder (e.g. outputs/tiny)")
    with FolderLock(ns.output_dir):  # not a folder a run is still writing: and no run starts there mid-push
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
                       help="resume a run: a checkpoint folder (complete: its trainer_state.json, weights) or a Hub "
                       "reference hf://USER/NAME[@REV][:SUBFOLDER] (the hf:// prefix is required: a bare USER/NAME "
                       "that is not a folder is an error, never a download)")
    train.add_argument("--overwrite-output-dir", action="store_true",
                       help="train into an output folder that holds another (finished or stopped) run, writing over "
                       "it; without it such a folder is refused. A folder a live run is using is always refused")
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
    ev.add_argument("model", help="a model folder (e.g. outputs/tiny) or a Hub reference hf://USER/NAME[@REV][:SUBFOLDER]")
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
    except USER_ERRORS as err:
        print(f"hf-dograph: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m hf_dograph.cli
    sys.exit(main())
