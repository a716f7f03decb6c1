"""Publishing a run folder on the Hub: its DoGraph card regenerated first, only the published model sent.

`push_output_dir` is what `hf-dograph push` does (and `hf-dograph train --push-to-hub` at the end of a run).
What a push leaves out (the Trainer's private files, intermediate checkpoints, unfinished writes, and nested
runs such as the `uniform/` twin of `--compare-uniform`) is `push_ignore_patterns`. The transport is
`hub.py`'s; the card is `card`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import hub
from .card import is_dograph_card, write_model_card
from .errors import InputFileError
from .run_folder import model_folder_problem, run_files

#: Never pushed: the Trainer's private files (and our lock file), the intermediate checkpoints (as
#: `Trainer.push_to_hub`), at any depth, and unfinished writes. Nested runs are left out too (`push_ignore_patterns`).
PUSH_IGNORE = ["_*", "*/_*", "checkpoint-*", "*/checkpoint-*", "*.tmp", "*/.*.tmp", ".*.tmp"]


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload DoGraph model (hf_dograph)",
    create_card: bool | None = None,
    include_checkpoints: bool = False,
    create_pr: bool = False,
    create_repo: bool = True,
):
    """`hf-dograph push OUTPUT_DIR --repo-id USER/NAME`: create the repo if needed and upload the folder.

    The card (README.md) and plots are regenerated from the folder's files first, unless the folder holds a
    README.md that hf_dograph did not write (`create_card=None`, the default); True always writes it, False
    never. `checkpoint-*` folders are left out unless `include_checkpoints`, and so are nested runs (the
    `uniform/` twin of `--compare-uniform`: see `push_ignore_patterns`). `create_repo=False` when the repo is
    known to exist. Returns the `CommitInfo`.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise InputFileError(out, "no such folder", "push a run's output folder (e.g. outputs/tiny)")
    problem = model_folder_problem(out)
    if problem is not None:
        raise problem
    if create_repo:  # False: the repo exists (e.g. the Trainer created it), skip a round trip
        repo_id = hub.create_repo(repo_id, private=private, token=token)
    readme = out / "README.md"
    if create_card or (create_card is None and (not readme.exists() or is_dograph_card(readme))):
        write_model_card(out, repo_id=repo_id)
    ignore = push_ignore_patterns(out, include_checkpoints=include_checkpoints)
    return hub.upload_folder(out, repo_id, commit_message=commit_message, token=token, revision=revision,
                             ignore_patterns=ignore, create_pr=create_pr)


def nested_runs(output_dir: str | os.PathLike) -> list[str]:
    """Sub-folders of a run folder that are runs of their own (e.g. `uniform/`, the twin of `--compare-uniform`):
    they hold a model, a Trainer state or checkpoints, and are not the run's own `checkpoint-N` / `last-checkpoint`."""
    out = Path(output_dir)
    return sorted(p.name for p in out.iterdir()
                  if p.is_dir() and not hub.CHECKPOINT_FOLDER.match(p.name) and run_files(p)) if out.is_dir() else []


def push_ignore_patterns(output_dir: str | os.PathLike, include_checkpoints: bool = False) -> list[str]:
    """What a push of `output_dir` leaves out: `PUSH_IGNORE` (less the top-level `checkpoint-*` with
    `include_checkpoints`) and every nested run: only the published model's files go to the Hub."""
    ignore = [p for p in PUSH_IGNORE if not (include_checkpoints and p == "checkpoint-*")]
    return ignore + [f"{name}/*" for name in nested_runs(output_dir)]
