"""Hub round trip: push a run folder with its DoGraph card, pull models and checkpoints back.

References to something on the Hub are written `REPO_ID[@REVISION][:SUBFOLDER]`, e.g.
`me/tiny-dograph`, `me/tiny-dograph@v1`, `me/tiny-dograph:last-checkpoint`,
`me/tiny-dograph@0123abcd...:checkpoint-500`. A string naming an existing local folder is always
that folder.

- `push_output_dir(output_dir, repo_id)`: what `hf-dograph push` does (the card is regenerated first).
- `resolve_checkpoint(ref)`: a local folder holding a Trainer checkpoint (downloaded if `ref` is on the
  Hub; with no subfolder given, the repo's root if it is a checkpoint, else `last-checkpoint/` as
  `hub_strategy="checkpoint"` pushes it, else its highest `checkpoint-N/`).
- `resolve_model(ref)`: a local folder holding a model (downloaded if on the Hub, checkpoints left out).
- `from_pretrained_kwargs(ref)`: the arguments of `from_pretrained` for a reference (no download).

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
#: Never pushed: the Trainer's private files and the intermediate checkpoints (as `Trainer.push_to_hub`).
PUSH_IGNORE = ["_*", "checkpoint-*", "*.tmp"]
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
                       local_dir: str | None = None) -> str:
    """A local folder holding a Trainer checkpoint, for `train(resume_from_checkpoint=...)`.

    An existing folder is returned as is. A Hub reference is downloaded (only the checkpoint's subfolder) to
    the Hub cache, or to `local_dir`; see the module docstring for how the subfolder is chosen.
    """
    if os.path.isdir(str(path_or_ref)):
        return str(path_or_ref)
    ref = parse_hub_reference(path_or_ref)
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
                  local_dir: str | None = None) -> str:
    """A local folder holding a model (weights, config, tokenizer): the folder itself, or a download of the
    Hub reference without its checkpoint folders, TensorBoard runs and other frameworks' weights."""
    if os.path.isdir(str(path_or_ref)):
        return str(path_or_ref)
    ref = parse_hub_reference(path_or_ref)
    ignore = MODEL_IGNORE + ([] if ref.subfolder else ["checkpoint-*", "last-checkpoint/*", "runs/*"])
    return _download(ref, ref.subfolder, token, cache_dir, local_dir, ignore=ignore)


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
):
    """`hf-dograph push OUTPUT_DIR --repo-id USER/NAME`: create the repo if needed and upload the folder.

    The card (README.md) and plots are regenerated from the folder's files first, unless the folder holds a
    README.md that hf_dograph did not write (`create_card=None`, the default); True always writes it, False
    never. `checkpoint-*` folders are left out unless `include_checkpoints`. Returns the `CommitInfo`.
    """
    from huggingface_hub import HfApi

    from .card import is_dograph_card, write_model_card

    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a folder: push a run's output directory")
    if not any((out / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(f"{out} holds no config.json or adapter_config.json: is it a saved model folder?")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    readme = out / "README.md"
    if create_card or (create_card is None and (not readme.exists() or is_dograph_card(readme))):
        write_model_card(out, repo_id=url.repo_id)
    ignore = [p for p in PUSH_IGNORE if not (include_checkpoints and p == "checkpoint-*")]
    return api.upload_folder(
        repo_id=url.repo_id, folder_path=str(out), commit_message=commit_message, token=token, revision=revision,
        ignore_patterns=ignore, create_pr=create_pr,
    )
