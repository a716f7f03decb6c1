"""Where recipes are and how one is read: lookup by name, YAML read with errors that name the line,
`extends` merged, and the embedded default (`tiny`) for installs without a recipes/ folder.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import yaml

from .spec import DEFAULT_RECIPE, RecipeError


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up by name: $HF_DOGRAPH_RECIPES, then the repository's recipes/."""
    dirs = []
    if os.environ.get("HF_DOGRAPH_RECIPES"):
        dirs += [Path(p) for p in os.environ["HF_DOGRAPH_RECIPES"].split(os.pathsep) if p]
    package = Path(__file__).resolve().parents[1]
    dirs += [package.parent / "recipes", package / "recipes"]  # source checkout; packaged copy
    return [d for d in dirs if d.is_dir()]


def available_recipes() -> dict[str, Path | None]:
    """Recipe name → file (None for the embedded default when no file provides it)."""
    found: dict[str, Path | None] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    found.setdefault(DEFAULT_RECIPE, None)
    return dict(sorted(found.items()))


def find_recipe(name_or_path: str) -> Path | None:
    """The file of a recipe given by name ("tiny") or path ("recipes/tiny.yaml").

    Returns None for the embedded default when no file provides it; raises `RecipeError`
    listing the available recipes when the name is unknown.
    """
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or "/" in name_or_path:
        if p.is_file():
            return p
        raise RecipeError(f"recipe file {name_or_path!r} does not exist")
    recipes = available_recipes()
    if name_or_path in recipes:
        return recipes[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(recipes), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(f"unknown recipe {name_or_path!r}.{hint} Available: {', '.join(recipes)}")


def read_yaml(path: Path) -> dict:
    """A recipe file's mapping; `RecipeError` naming the file, the line and the fix when it cannot be read."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RecipeError(f"recipe {path}, line {line} (byte offset {err.start}): not UTF-8 text (byte "
                          f"0x{data[err.start]:02x}). Fix: save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError(f"recipe {path}{where}: not valid YAML ({problem}). Fix: correct that line (`key: value`, "
                          "nested keys indented with spaces, no tabs)") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections. Fix: write it as "
                          "`model:`, `data:`, `training:`... sections (see recipes/tiny.yaml)")
    return raw


def deep_merge(base: dict, override: dict) -> dict:
    """`base` updated by `override`, recursively for nested mappings (lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_extends(raw: dict, path: Path | None, seen: tuple = ()) -> dict:
    """`raw` merged over the recipe it `extends` (found beside `path` first, then by name), recursively."""
    parent = raw.get("extends")
    if not parent:
        return raw
    if parent in seen:
        raise RecipeError(f"recipe 'extends' loops: {' -> '.join(seen + (parent,))}")
    parent_path = None
    if path is not None and (path.parent / f"{parent}.yaml").is_file():
        parent_path = path.parent / f"{parent}.yaml"
    else:
        parent_path = find_recipe(parent)
    parent_raw = read_yaml(parent_path) if parent_path else embedded_default_raw()
    parent_raw = resolve_extends(parent_raw, parent_path, seen + (parent,))
    merged = deep_merge(parent_raw, {k: v for k, v in raw.items() if k != "extends"})
    merged.pop("extends", None)
    if "name" not in raw:  # a child is not its parent
        merged.pop("name", None)
    return merged


def embedded_default_raw() -> dict:
    """The default recipe (`tiny`) as shipped inside the package, for installs without recipes/."""
    return yaml.safe_load(TINY_RECIPE_YAML)


# The default recipe, kept inside the package so that `hf-dograph train` works from any install
# (a wheel has no recipes/ folder). tests/test_recipes.py checks it equals recipes/tiny.yaml.
TINY_RECIPE_YAML = """\
# tiny: the embedded default. `hf-dograph train` with no recipe runs this.
#
# A tiny GPT-2 trained from scratch with DoGraph on the embedded corpus: five generated text
# domains (prose 60% ... arithmetic 2%) that need no files and no network. It finishes in
# under 3 minutes on 2 CPU cores and ends with a per-domain validation table. It shows the
# mechanics, not the paper's numbers: for those see the gpt2-*/llama recipes.
#
# Try: hf-dograph train --compare-uniform            (DoGraph vs plain Trainer, side by side)
#      hf-dograph train --set dograph.objective=robust --set training.max_steps=100
name: tiny
description: "Embedded default: tiny GPT-2 from scratch on the built-in 5-domain corpus (CPU, < 3 min)"
trainer: dograph              # dograph = DoGraphTrainer; uniform = plain transformers.Trainer

model:
  config:                     # an architecture, randomly initialized (trained from scratch)
    model_type: gpt2
    n_layer: 2
    n_embd: 64
    n_head: 4
    n_positions: 128          # >= data.seq_len
    # vocab_size: from the tokenizer (259 for bytes)

tokenizer:
  name: bytes                 # one token per UTF-8 byte: a 259-token vocabulary keeps the model tiny

data:
  source: embedded            # the built-in generated corpus
  embedded_chars: 400000      # ~400k bytes = ~400k tokens
  embedded_proportions:       # the human domains and their (unbalanced) shares of the text
    prose: 0.60
    code: 0.20
    dialogue: 0.10
    tables: 0.08
    arithmetic: 0.02
  seq_len: 128
  packing: pack               # blocks of 128 tokens, one domain per block, no token lost
  validation_fraction: 0.1    # per domain

dograph:
  # The package defaults (m = 11 persistent domains, uncertainty objective, ε = mean σ², smoothed weights,
  # 256 samples of warm-up), with a small sketch: the projection is regenerated each step, keep it cheap on CPU.
  projection_dim: 64
  grad_engine: factored

training:
  max_steps: 200
  per_device_train_batch_size: 16
  per_device_eval_batch_size: 32
  learning_rate: 3.0e-3       # tiny models take large steps
  lr_scheduler_type: cosine
  warmup_steps: 20
  weight_decay: 0.01
  max_grad_norm: 1.0
  logging_steps: 25
  save_strategy: "no"         # one final checkpoint, written by hf-dograph
  eval_strategy: "no"         # the per-domain table at the end replaces it
  report_to: none
  seed: 0
  dataloader_drop_last: true  # no 2-sequence batch at an epoch's end
  dataloader_num_workers: 0
"""
