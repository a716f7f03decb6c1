"""Hub transport: references to the Hub, models and checkpoints pulled from it, folders pushed to it.

It knows nothing of run folders or model cards: what a run publishes, and its card, are `publish.py`'s.

References to something on the Hub are written `[hf://]REPO_ID[@REVISION][:SUBFOLDER]`, e.g.
`hf://me/tiny-dograph`, `me/tiny-dograph@v1`, `me/tiny-dograph:last-checkpoint`,
`me/tiny-dograph@0123abcd...:checkpoint-500`.

Local path or Hub reference? (`locate`)

1. A string naming an existing local path is always that path.
2. `hf://USER/NAME[@REV][:SUBFOLDER]` is always a Hub reference.
3. A string that looks like a local path and does not exist is an error ("no such folder"), never a
   Hub lookup: it starts with `.`, `/`, `~` or a drive letter, holds a backslash, has more than one
   `/` before its `@`/`:` part, ends with `/`, its first component is an existing local folder
   (`outputs/chekpoint-5`), or its last one is named like a checkpoint (`checkpoint-N`, `last-checkpoint`).
4. Any other bare `USER/NAME[@REV][:SUBFOLDER]` is a Hub reference only where bare ids are allowed:
   the Python API (`resolve_checkpoint`, `resolve_model`, `train(resume_from_checkpoint="me/run")`),
   where existing scripts pass them; the command line (`--resume-from-checkpoint`, `hf-dograph eval`)
   needs the `hf://` prefix, so a mistyped folder such as `some/typo` is reported as a missing folder
   instead of being downloaded from someone else's repo (or failing with `OfflineModeIsEnabled`).

- `locate(ref)`: ("local", path) or ("hub", HubRef), by the rules above.
- `resolve_checkpoint(ref)`: a local folder holding a Trainer checkpoint (downloaded if `ref` is on the
  Hub; with no subfolder given, the repo's root if it is a checkpoint, else `last-checkpoint/` as
  `hub_strategy="checkpoint"` pushes it, else its highest `checkpoint-N/`).
- `resolve_model(ref)`: a local folder holding a model (downloaded if on the Hub, checkpoints left out).
- `from_pretrained_kwargs(ref)`: the arguments of `from_pretrained` for a reference (no download).
- `create_repo(repo_id)`, `upload_folder(folder, repo_id)`: a repo made sure of, a folder sent in one commit.

`huggingface_hub` decides where the Hub is (`HF_ENDPOINT`) and whether it may be reached (`HF_HUB_OFFLINE`);
downloads go through its cache, so a second resolve of the same revision reads no network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
_REF = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<rev>[^:@]+))?(?::(?P<sub>[^:@]+))?$")
#: Not needed to load a model with transformers: other frameworks' weights and exports.
MODEL_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "*.tflite", "coreml/*", "*.gguf", "*.mlmodel"]


class HubReferenceError(ValueError):
    """A string is neither an existing folder nor a valid Hub reference, or the reference holds no checkpoint."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return self.repo_id + rev + (f":{self.subfolder}" if self.subfolder else "")


#: The names the Trainer gives checkpoint folders (`hub_strategy="checkpoint"` pushes `last-checkpoint`).
CHECKPOINT_FOLDER = re.compile(r"^(checkpoint-\d+|last-checkpoint)$")


def looks_local(value: str) -> bool:
    """Whether `value` reads as a local path rather than a Hub id (rule 3 of the module docstring)."""
    text = str(value).strip()
    if not text or text.startswith("hf://"):
        return False
    if text.startswith((".", "/", "~", "\\")) or "\\" in text or re.match(r"^[A-Za-z]:", text):
        return True
    base = re.split(r"[@:]", text, maxsplit=1)[0]
    parts = base.split("/")
    if base.endswith("/") or len(parts) > 2:
        return True
    if len(parts) == 2 and os.path.isdir(parts[0]):
        return True
    return bool(CHECKPOINT_FOLDER.match(parts[-1]))


def _no_such_path(value: str, hint_hub: bool) -> HubReferenceError:
    full = os.path.abspath(os.path.expanduser(value))
    parent = Path(full).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    fix = f"check the path (the nearest existing folder is {parent})"
    if hint_hub:
        fix += f"; if you mean the Hub repo, write hf://{value}"
    else:
        fix += "; a Hub repo is written hf://USER/NAME[@REVISION][:SUBFOLDER]"
    return HubReferenceError(f"{value}: no such file or folder ({full}). Fix: {fix}")


def locate(value: str, *, bare_hub_ids: bool = True) -> tuple[str, "str | HubRef"]:
    """("local", path) or ("hub", HubRef) for a string naming a checkpoint or a model, by the rules of the
    module docstring; `HubReferenceError` (one line, with the fix) for a missing path or a bad reference."""
    text = str(value).strip()
    if os.path.exists(os.path.expanduser(text)) and not text.startswith("hf://"):
        return "local", os.path.expanduser(text)
    if text.startswith("hf://"):
        return "hub", parse_hub_reference(text)
    if looks_local(text):
        raise _no_such_path(text, hint_hub=False)
    ref = parse_hub_reference(text)
    if not bare_hub_ids:
        raise _no_such_path(text, hint_hub=True)
    return "hub", ref


def parse_hub_reference(ref: str) -> HubRef:
    """`REPO_ID[@REVISION][:SUBFOLDER]` → HubRef (ValueError naming the expected form otherwise)."""
    match = _REF.match(str(ref).strip())
    if not match:
        raise HubReferenceError(
            f"{ref!r} is not an existing folder nor a Hub reference of the form USER/NAME[@REVISION][:SUBFOLDER] "
            "(e.g. me/tiny-dograph@main:last-checkpoint)"
        )
    sub = match["sub"].strip("/") if match["sub"] else None
    return HubRef(match["repo"], match["rev"], sub or None)


def is_hub_reference(ref: str) -> bool:
    """True for a string that is not an existing local path and parses as a Hub reference."""
    return not os.path.exists(str(ref)) and _REF.match(str(ref).strip()) is not None


def from_pretrained_kwargs(ref: str) -> dict:
    """{"pretrained_model_name_or_path", "revision"?, "subfolder"?} for `from_pretrained`; a folder stays a folder."""
    if os.path.exists(str(ref)) or not is_hub_reference(ref):
        return {"pretrained_model_name_or_path": str(ref)}
    r = parse_hub_reference(ref)
    kwargs = {"pretrained_model_name_or_path": r.repo_id}
    if r.revision:
        kwargs["revision"] = r.revision
    if r.subfolder:
        kwargs["subfolder"] = r.subfolder
    return kwargs


def _list_files(ref: HubRef, token) -> list[str] | None:
    """The repo's files at the revision, or None when the Hub cannot be asked (offline: use the cache)."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return None
    return HfApi(token=token).list_repo_files(ref.repo_id, revision=ref.revision)


def checkpoint_subfolder(files: list[str]) -> str | None:
    """Where the Trainer checkpoint is in a repo's file list: "" (the root), "last-checkpoint", the highest
    "checkpoint-N", or None when there is none."""
    if TRAINER_STATE in files:
        return ""
    if f"last-checkpoint/{TRAINER_STATE}" in files:
        return "last-checkpoint"
    steps = [int(m[1]) for f in files if (m := re.fullmatch(rf"checkpoint-(\d+)/{TRAINER_STATE}", f))]
    return f"checkpoint-{max(steps)}" if steps else None


def _download(ref: HubRef, subfolder: str | None, token, cache_dir, local_dir, ignore=None) -> str:
    from huggingface_hub import snapshot_download

    allow = [f"{subfolder}/*"] if subfolder else None
    root = snapshot_download(
        ref.repo_id, revision=ref.revision, allow_patterns=allow, ignore_patterns=ignore, token=token,
        cache_dir=cache_dir, local_dir=local_dir,
    )
    return os.path.join(root, subfolder) if subfolder else root


def resolve_checkpoint(path_or_ref: str, *, token: str | None = None, cache_dir: str | None = None,
                       local_dir: str | None = None, bare_hub_ids: bool = True) -> str:
    """A local folder holding a Trainer checkpoint, for `train(resume_from_checkpoint=...)`.

    An existing folder is returned as is. A Hub reference is downloaded (only the checkpoint's subfolder) to
    the Hub cache, or to `local_dir`; see the module docstring for how the subfolder is chosen and for which
    strings are Hub references (`bare_hub_ids=False`: only `hf://...`, as on the command line).
    """
    kind, ref = locate(path_or_ref, bare_hub_ids=bare_hub_ids)
    if kind == "local":
        if not os.path.isdir(ref):
            raise HubReferenceError(f"{path_or_ref} is a file, not a checkpoint folder. Fix: name the checkpoint-N "
                                    "folder that holds it")
        return ref
    subfolder = ref.subfolder
    if subfolder is None:
        files = _list_files(ref, token)
        if files is not None:
            subfolder = checkpoint_subfolder(files)
            if subfolder is None:
                raise HubReferenceError(
                    f"{ref} holds no Trainer checkpoint ({TRAINER_STATE} at its root, in last-checkpoint/ or in a "
                    "checkpoint-N/ folder): push with hub_strategy='checkpoint' or 'all_checkpoints', or name the "
                    "folder as REPO:SUBFOLDER"
                )
    path = _download(ref, subfolder or None, token, cache_dir, local_dir)
    if subfolder is None:  # offline: the whole cached snapshot, look inside it
        found = checkpoint_subfolder([p.relative_to(path).as_posix() for p in Path(path).rglob(TRAINER_STATE)])
        if found is None:
            raise HubReferenceError(f"the cached copy of {ref} holds no Trainer checkpoint")
        path = os.path.join(path, found) if found else path
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise HubReferenceError(f"{ref} has no {TRAINER_STATE}: it is not a Trainer checkpoint")
    return path


def resolve_model(path_or_ref: str, *, token: str | None = None, cache_dir: str | None = None,
                  local_dir: str | None = None, bare_hub_ids: bool = True) -> str:
    """A local folder holding a model (weights, config, tokenizer): the folder itself, or a download of the
    Hub reference without its checkpoint folders, TensorBoard runs and other frameworks' weights
    (`bare_hub_ids`: see `resolve_checkpoint`)."""
    kind, ref = locate(path_or_ref, bare_hub_ids=bare_hub_ids)
    if kind == "local":
        return ref
    ignore = MODEL_IGNORE + ([] if ref.subfolder else ["checkpoint-*", "last-checkpoint/*", "runs/*"])
    return _download(ref, ref.subfolder, token, cache_dir, local_dir, ignore=ignore)


def create_repo(repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Create the model repo `repo_id` unless it exists; returns its full id (`USER/NAME`, as the Hub names it)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id


def upload_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str, token: str | None = None,
                  revision: str | None = None, ignore_patterns: list[str] | None = None, create_pr: bool = False):
    """Send `folder` to the repo in one commit, less the files matching `ignore_patterns`; returns the
    `CommitInfo`."""
    from huggingface_hub import HfApi

    return HfApi(token=token).upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token, revision=revision,
        ignore_patterns=ignore_patterns, create_pr=create_pr,
    )
