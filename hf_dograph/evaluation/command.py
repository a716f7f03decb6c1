"""`hf-dograph eval`'s work: a model (a folder or a Hub reference) evaluated per domain on a data spec's
validation split (the split `hf-dograph train` held out), as a table and a JSON-able dict.
"""

from __future__ import annotations

import os

from ..hub import resolve_model
from ..jsonfiles import write_json
from ..run_folder import model_folder_problem
from .per_domain import evaluate_per_domain


def data_spec(data):
    """A DataSpec from a DataSpec, a dict of its fields, or a recipe name / YAML path (its `data:` section)."""
    from ..data import DataSpec

    if isinstance(data, DataSpec):
        return data
    if isinstance(data, dict):
        return DataSpec(**data)
    from ..recipes import load_recipe

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

    from ..data import DomainCollator, build_domain_dataset, load_tokenizer

    model_dir = resolve_model(model, token=token, bare_hub_ids=bare_hub_ids)
    problem = model_folder_problem(model_dir)
    if problem is not None:
        raise problem
    spec = data_spec(data)
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
