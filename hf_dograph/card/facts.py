"""What a run folder says for its model card, read once into `RunFacts`; the card renders from those.

A run folder holds (each file optional):

- `dograph_state.json`: settings, weight history, last step (`state_file`);
- `recipe.yaml`, `domain_names.json`, `per_domain_eval.json` (written by `hf-dograph train`), and
  `lm_eval_results.json` (written by `evaluation.lm_eval_scores`);
- `config.json` / `adapter_config.json` and the weights' headers: model type, size, base model;
- `dograph_plots/*.png` (drawn by `card.write_model_card` from the state).

A file that cannot be read is left out, with a warning: a card is never refused for a damaged extra.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation.lm_harness import LM_EVAL_FILE
from ..evaluation.per_domain import PER_DOMAIN_FILE
from ..plots import PLOT_FILES, PLOTS_DIR, domain_names_from
from ..redaction import public_recipe
from ..errors import one_line
from ..state_file import DOGRAPH_STATE_NAME, load_dograph_state

logger = logging.getLogger(__name__)


@dataclass
class RunFacts:
    """Everything the card shows that comes from a run folder (or from the caller, who may know better).

    state: the DoGraph state ({} when there is none); recipe_text: the recipe made public (no credentials,
    no local paths) and recipe_raw: as written, for reading only; per_domain: `PerDomainResult.to_dict()`'s
    form; lm_eval: `lm_harness.scores_from_lm_eval`'s form; identity: library, model_type, base_model (a Hub
    id or None); plots: {plot name: path inside the folder} of the plots drawn there.
    """

    folder_name: str
    state: dict = field(default_factory=dict)
    recipe_text: str | None = None
    recipe_raw: dict | None = None
    per_domain: dict | None = None
    lm_eval: dict | None = None
    domain_names: list[str] | None = None
    identity: dict = field(default_factory=dict)
    num_parameters: int | None = None
    plots: dict[str, str] = field(default_factory=dict)


def read_run_facts(output_dir: str | os.PathLike, *, state: dict | None = None, per_domain=None,
                   lm_eval: dict | None = None, domain_names: list[str] | None = None) -> RunFacts:
    """The facts of a run folder; what the caller passes replaces the folder's file (per_domain may be a
    `PerDomainResult`, its dict, or the CLI's `per_domain_eval.json` form)."""
    out = Path(output_dir)
    if state is None and (out / DOGRAPH_STATE_NAME).is_file():
        state = load_dograph_state(out)
    recipe_text, recipe_raw = read_recipe(out)
    per_domain = normalize_per_domain(per_domain if per_domain is not None else read_json(out / PER_DOMAIN_FILE))
    lm_eval = lm_eval if lm_eval is not None else read_json(out / LM_EVAL_FILE)
    domain_names = domain_names or domain_names_from(out)
    if domain_names is None and per_domain:
        domain_names = list(per_domain["domains"])
    return RunFacts(
        folder_name=out.resolve().name, state=state or {}, recipe_text=recipe_text, recipe_raw=recipe_raw,
        per_domain=per_domain, lm_eval=lm_eval, domain_names=domain_names, identity=model_identity(out, recipe_raw),
        num_parameters=count_parameters(out),
        plots={name: f"{PLOTS_DIR}/{fname}" for name, fname in PLOT_FILES.items() if (out / PLOTS_DIR / fname).is_file()},
    )


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None


def read_recipe(output_dir: Path) -> tuple[str | None, dict | None]:
    """The run's recipe as the card shows it (text) and as parsed (raw, as written: for reading only).

    The card is public: the text is the recipe without credentials and with local paths made public
    (`redaction.public_recipe`), whatever `recipe.yaml` holds (a hand-written or older one may hold both).
    A recipe.yaml that cannot be parsed is left out of the card, with a warning.
    """
    path = output_dir / "recipe.yaml"
    if not path.is_file():
        return None, None
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        logger.warning("model card: %s is not readable YAML, left out of the card (%s)", path, one_line(err))
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


def looks_like_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub id (`NAME` or `USER/NAME`) and is no local path: worth naming on the Hub."""
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def model_identity(output_dir: Path, recipe_raw: dict | None) -> dict:
    """library (transformers or peft), model type and base model, from the files of the folder."""
    adapter = read_json(output_dir / "adapter_config.json")
    config = read_json(output_dir / "config.json") or {}
    info = {"library": "transformers", "model_type": config.get("model_type"), "base_model": None}
    if adapter:
        info["library"] = "peft"
        info["base_model"] = adapter.get("base_model_name_or_path")
        kind = str(adapter.get("peft_type") or "PEFT")
        info["model_type"] = "LoRA adapter" if kind.upper() == "LORA" else f"{kind} adapter"
    model_section = (recipe_raw or {}).get("model") or {}
    if model_section.get("name_or_path") and not model_section.get("from_scratch"):
        info["base_model"] = info["base_model"] or model_section["name_or_path"]
    if not looks_like_hub_id(info["base_model"]):
        info["base_model"] = None  # a local folder means nothing to a reader of the Hub page
    return info
