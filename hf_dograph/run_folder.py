"""Output folders are owned: what counts as a run in a folder, who may train into it, which checkpoint
to resume from.

The rules (used by `hf-dograph train` and by `DoGraphTrainer.train()`, through `claim_output_dir`):

1. A folder that holds another run (a `checkpoint-N/`, `trainer_state.json`, model weights,
   `dograph_state.json`, `recipe.yaml`...) is refused unless told what to do with it: resume it
   (`--resume-from-checkpoint` / `train(resume_from_checkpoint=...)`) or train over it
   (`--overwrite-output-dir` / `train(overwrite_output_dir=True)`, or `overwrite_output_dir` in
   arguments of transformers versions that still have it). As transformers' example scripts did with
   `overwrite_output_dir`, nothing is deleted: the new run writes over the old one's files.
   A folder this process has already trained into is its own: a script may call `train()` twice on
   the same folder (train, then train more; train, then resume) without being refused.
2. While a run trains, it holds the folder's lock (`folder_lock.FolderLock`): a second run into the
   same folder, from any process on any machine sharing the disk, is refused at once.
3. `resume_from_checkpoint=True` takes the last *complete* checkpoint: one with its
   `trainer_state.json` (the Trainer writes it last), its weights and, for DoGraph, a readable
   `dograph_state.json`. Partial checkpoints (a run killed while saving) are skipped with a warning.
   A checkpoint named explicitly must be complete; otherwise the error names what is missing and
   the last complete checkpoint to use instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from .errors import InputFileError, one_line
from .folder_lock import LOCK_NAME, FolderLock
from .hub import TRAINER_STATE

logger = logging.getLogger(__name__)

DOGRAPH_STATE = "dograph_state.json"
WEIGHT_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)
#: Files that say "a run was here" (the lock file and files a user may put there first, such as
#: domain_names.json, do not).
RUN_FILES = (TRAINER_STATE, "training_args.bin", DOGRAPH_STATE, "recipe.yaml", "per_domain_eval.json") + WEIGHT_FILES
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_owned: set[str] = set()  # folders this process has claimed: its own runs


class RunFolderError(ValueError):
    """An output folder cannot be used as asked; the message names the folder, the reason and the fix."""


# ----------------------------------------------------------------------------- what a folder holds
def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `folder`, by increasing N."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def run_files(folder: str | os.PathLike) -> list[str]:
    """Names of the files and checkpoint folders in `folder` that belong to a run (empty: no run there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).is_file()]
    return found + [p.name for p in checkpoints(folder)]


def _json_problem(path: Path) -> str | None:
    from .jsonfiles import read_json

    try:
        read_json(path, fix="")
    except InputFileError:
        return f"{path.name} is truncated or not valid JSON"
    return None


def checkpoint_problems(path: str | os.PathLike, *, require_dograph_state: bool = True) -> list[str]:
    """What a checkpoint folder lacks to be resumed from (empty: it is complete)."""
    path = Path(path)
    if not path.is_dir():
        return ["it is not a folder"]
    problems = []
    if not (path / TRAINER_STATE).is_file():
        problems.append(f"no {TRAINER_STATE}")
    elif (p := _json_problem(path / TRAINER_STATE)) is not None:
        problems.append(p)
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob("global_step*")):
        problems.append("no model weights")  # (global_step*/: DeepSpeed's own layout)
    if require_dograph_state:
        if not (path / DOGRAPH_STATE).is_file():
            problems.append(f"no {DOGRAPH_STATE}")
        elif (p := _json_problem(path / DOGRAPH_STATE)) is not None:
            problems.append(p)
    return problems


def last_complete_checkpoint(folder: str | os.PathLike, *, require_dograph_state: bool = True,
                             warn: bool = True) -> tuple[Path | None, list[tuple[str, list[str]]]]:
    """(the highest complete `checkpoint-N` of `folder` or None, [(skipped name, its problems)])."""
    skipped = []
    for path in reversed(checkpoints(folder)):
        problems = checkpoint_problems(path, require_dograph_state=require_dograph_state)
        if not problems:
            if warn and skipped:
                logger.warning(
                    "resuming from %s, the last complete checkpoint; skipped %s", path,
                    "; ".join(f"{name} ({', '.join(p)}: a run stopped while saving it?)" for name, p in skipped),
                )
            return path, skipped
        skipped.append((path.name, problems))
    return None, skipped


def resume_checkpoint(output_dir: str | os.PathLike, resume, *, bare_hub_ids: bool = True,
                      require_dograph_state: bool = True) -> str | None:
    """The local checkpoint folder a run resumes from, or None for a fresh run.

    `resume`: None/False (no resume), True (the last complete checkpoint of `output_dir`), a folder, or
    a Hub reference (downloaded; `hub.resolve_checkpoint` says which strings are, with `bare_hub_ids`).
    Raises `RunFolderError` / `InputFileError` / `HubReferenceError` with a one-line message.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        path, skipped = last_complete_checkpoint(output_dir, require_dograph_state=require_dograph_state)
        if path is None:
            why = ("; skipped " + "; ".join(f"{n} ({', '.join(p)})" for n, p in skipped)) if skipped else ""
            raise RunFolderError(one_line(
                f"resume_from_checkpoint=True: {output_dir} holds no complete checkpoint-N{why}. Fix: train without "
                "resuming (and --overwrite-output-dir / overwrite_output_dir=True to train over that folder), or "
                "name a complete checkpoint"))
        return str(path)
    from .hub import resolve_checkpoint

    path = Path(resolve_checkpoint(str(resume), bare_hub_ids=bare_hub_ids))
    problems = checkpoint_problems(path, require_dograph_state=False)
    if problems:
        parent = path.parent if _CHECKPOINT.match(path.name) else path
        best, _ = last_complete_checkpoint(parent, require_dograph_state=require_dograph_state, warn=False)
        instead = f"resume from {best} (the last complete one)" if best is not None and best != path else (
            "name a checkpoint-N folder written by the Trainer")
        what = "an incomplete checkpoint" if _CHECKPOINT.match(path.name) else "not a Trainer checkpoint"
        raise InputFileError(path, f"{what} ({', '.join(problems)})",
                             f"{instead}, or pass resume_from_checkpoint=True to pick the last complete one")
    return str(path)


def model_folder_problem(path: str | os.PathLike) -> InputFileError | None:
    """An error for a folder that holds no model (for `hf-dograph eval`), or None when it holds one."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    best, _ = last_complete_checkpoint(path, require_dograph_state=False, warn=False)
    if best is not None:
        fix = f"evaluate its last complete checkpoint: {best}"
    elif run_files(path) or (path / LOCK_NAME).is_file():
        fix = "the run writing it has not saved a model yet: wait for it to finish, or evaluate a checkpoint-N"
    else:
        fix = "point to a folder written by `hf-dograph train` (e.g. outputs/tiny) or to one of its checkpoint-N"
    return InputFileError(path, "this folder holds no model (no config.json or adapter_config.json)", fix)


# ----------------------------------------------------------------------------- claiming a folder
def mark_owned(folder: str | os.PathLike) -> None:
    """Record that this process wrote a run into `folder` (e.g. `save_model` before `train()`): its own files
    never make it refuse that folder."""
    _owned.add(str(Path(folder).resolve()))


def _refusal(folder: Path, found: list[str], how: str) -> RunFolderError:
    best, _ = last_complete_checkpoint(folder, require_dograph_state=False, warn=False)
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if how == "cli":
        resume = f"--resume-from-checkpoint {best} to continue it, " if best is not None else ""
        fix = f"{resume}--overwrite-output-dir to train over it, or --output-dir to train elsewhere"
    else:
        resume = f"train(resume_from_checkpoint=True) to continue it from {best.name}, " if best is not None else ""
        fix = f"{resume}train(overwrite_output_dir=True) to train over it, or another output_dir"
    if best is None:
        fix += " (it has no complete checkpoint-N to resume from)"
    return RunFolderError(one_line(f"{folder} holds another run ({shown}): training there would overwrite it. "
                                   f"Fix: {fix}"))


@contextlib.contextmanager
def claim_output_dir(folder: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                     lock: bool = True, how: str = "library"):
    """Hold `folder` for a run (see the module docstring): lock it, and refuse it when it holds another
    run unless `overwrite` or `resume`. `lock=False` on the processes of a multi-process run that do not
    write (the main process holds the lock for all). `how` ("cli" or "library") words the fix."""
    folder = Path(folder)
    key = str(folder.resolve())
    held = FolderLock(folder).acquire() if lock else None
    try:
        if key not in _owned and not overwrite and not resume:
            found = run_files(folder)
            if found:
                raise _refusal(folder, found, how)
        if overwrite and key not in _owned and checkpoints(folder):
            logger.warning(
                "%s: training over a previous run; its checkpoints (%s) stay until this run's own replace them, "
                "and resume_from_checkpoint=True may pick one of them.", folder,
                ", ".join(p.name for p in checkpoints(folder)),
            )
        _owned.add(key)
        yield folder
    finally:
        if held is not None:
            held.release()


# ----------------------------------------------------------------------------- private temporary folders
def private_temp_dir(prefix: str, shared_key: str | None = None) -> Path:
    """A fresh folder only this user can enter, for throw-away outputs (`--smoke`).

    Without `shared_key`: `tempfile.mkdtemp` (a new, unguessable name, mode 0700). With one (several
    processes of one launched run must agree on the folder): `<tmp>/<prefix><uid>-<key>`, created with
    mode 0700 by the first process; a path that exists as a symlink, is not a folder, belongs to another
    user or is open to others is refused, never followed.
    """
    if shared_key is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    uid = os.getuid() if hasattr(os, "getuid") else 0
    safe_key = re.sub(r"[^A-Za-z0-9_.-]", "_", shared_key)[:80]
    path = Path(tempfile.gettempdir()) / f"{prefix}{uid}-{safe_key}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != uid) \
            or st.st_mode & 0o077:
        raise RunFolderError(one_line(
            f"{path} exists and is not a private folder of this user (a symlink, another user's, or open to others): "
            "refusing to write there. Fix: pass --output-dir, or remove it if it is yours"))
    return path
