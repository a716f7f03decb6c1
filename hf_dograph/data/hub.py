"""Check, before any training starts, that a Hub model or dataset named by a recipe can be had.

A recipe that names a Hub resource fails early, with the resource's name and the fix, when
the Hub cannot be reached (offline mode, no network) and there is no local copy: better
than a stack trace from deep inside `from_pretrained` after minutes of setup.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}


class HubAccessError(RuntimeError):
    """A Hub resource named by a recipe cannot be reached and has no local copy."""


def hub_offline() -> bool:
    """Whether Hub access is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(n, "").strip().lower() in _TRUE for n in names):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def hub_cache_dir() -> Path:
    """The Hub cache folder, read from the environment now (tests and users may change it at run time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _datasets_cache_dir() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return hub_cache_dir().parent / "datasets"


def is_cached(repo_id: str, repo_type: str = "model") -> bool:
    """Whether a snapshot of `repo_id` is in the local Hub cache (or, for datasets, the datasets cache)."""
    folder = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if repo_type == "dataset":
        # `datasets` keeps its prepared Arrow copy as owner___name.
        prepared = _datasets_cache_dir() / repo_id.replace("/", "___")
        if prepared.is_dir() and any(prepared.iterdir()):
            return True
    return False


def _fix(repo_id: str, repo_type: str, what: str) -> str:
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    local = "data.source: local (or folder) with data.path" if repo_type == "dataset" else "a local folder path"
    return (
        f"download it first on a machine with network (`hf download{kind} {repo_id}`, then copy the cache), "
        f"or point {what} at {local}"
    )


def check_hub_resource(repo_id: str, repo_type: str = "model", what: str = "", streaming: bool = False) -> str:
    """Make sure `repo_id` can be loaded; return how ("local", "hub" or "cache").

    `what` names the recipe field (e.g. "model.name_or_path") for the error message. A local
    folder always wins. Raises `HubAccessError` naming the resource and the fix when the Hub is
    off or unreachable and there is no cached copy (streaming needs the Hub itself).
    """
    if Path(repo_id).expanduser().exists():
        return "local"
    label = f"Hub {repo_type} '{repo_id}'" + (f" ({what})" if what else "")
    if not hub_offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        try:
            HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
            return "hub"
        except GatedRepoError:
            raise HubAccessError(
                f"{label} is gated: accept its license on the Hub and log in (`hf auth login`)"
            ) from None
        except RepositoryNotFoundError:
            raise HubAccessError(
                f"{label} does not exist on the Hub (or is private: log in with `hf auth login`); "
                "check the name or use a local path"
            ) from None
        except Exception as err:  # no network, DNS failure, timeout, proxy error...
            reason = f"the Hub is unreachable ({type(err).__name__})"
    else:
        reason = "Hub access is off (HF_HUB_OFFLINE=1)"
    if streaming:
        raise HubAccessError(
            f"{label}: {reason}, and streaming reads from the Hub. Set data.streaming=false to use a "
            f"downloaded copy, or {_fix(repo_id, repo_type, what or 'the recipe')}"
        )
    if is_cached(repo_id, repo_type):
        return "cache"
    raise HubAccessError(
        f"{label}: {reason} and there is no local copy in {hub_cache_dir()}. "
        f"To fix: {_fix(repo_id, repo_type, what or 'the recipe')}"
    )
