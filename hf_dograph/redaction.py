"""What hf_dograph writes never holds a credential, and model cards never hold a local path.

One place decides what a secret is, and every writer goes through it: recipes (`recipe.yaml`,
`hf-dograph show`), model cards, JSON files (`jsonfiles`), the pickled `training_args.bin`.

A *credential field* is a field whose name says it holds one (`is_credential_key`): it ends with
"token" (`hub_token`, `token`, `auth_token`, `HF_TOKEN`; not a tokenizer's `pad_token`, `eos_token`...
nor `include_num_input_tokens_seen` / `pad_token_id`), or it names a secret, password, API key,
private or access key, or credentials anywhere in it. A credential field holding a string is dropped
from recipes and JSON and set to None in pickled arguments. Strings elsewhere are scrubbed of
Hugging Face tokens (`hf_` followed by 20+ letters and digits) and of any secret value this process
has seen in a credential field (`remember_secret`), so a token pasted into free text is caught too.

Local paths: a model card is public, so a local path in it (a data file under /home/<user>/..., a
local model folder) is written relative to the working directory when it lies under it, else as its
last component (the dataset's or model's name) (`public_path`). `recipe.yaml` stays usable on the
machine that wrote it (`hf-dograph eval` rebuilds the validation split from it), so there only the
home directory is written as `~` (`home_relative`).
"""

from __future__ import annotations

import copy
import copyreg
import os
import re
from typing import Any

REDACTED = "<redacted>"
#: Tokenizer fields that are vocabulary entries, not credentials, although their names end in "token".
SPECIAL_TOKEN_FIELDS = frozenset({
    "pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token",
    "additional_special_token", "chat_token", "image_token", "video_token", "audio_token", "boi_token", "eoi_token",
})
_CREDENTIAL_WORDS = re.compile(
    r"(secret|passw(or)?d|passphrase|api[_-]?key|apikey|private[_-]?key|access[_-]?key|credential)", re.I
)
_ENDS_WITH_TOKEN = re.compile(r"(^|[_.\-\s])token$|[a-z]Token$", re.I)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_seen_secrets: set[str] = set()


# ----------------------------------------------------------------------------- what is a secret
def is_credential_key(key: Any) -> bool:
    """Whether a field named `key` holds a credential (see the module docstring for the rule)."""
    if not isinstance(key, str):
        return False
    name = key.strip()
    if name.lower() in SPECIAL_TOKEN_FIELDS:
        return False
    return bool(_ENDS_WITH_TOKEN.search(name) or _CREDENTIAL_WORDS.search(name))


def remember_secret(value: Any) -> None:
    """Scrub `value` from every string written from now on in this process (short values are ignored:
    replacing a 3-letter string everywhere would mangle text)."""
    if isinstance(value, str) and len(value) >= 8:
        _seen_secrets.add(value)


def scrub_text(text: str) -> str:
    """`text` with Hugging Face tokens and remembered secret values replaced by `<redacted>`."""
    if not isinstance(text, str) or not text:
        return text
    for secret in _seen_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _HF_TOKEN.sub(REDACTED, text)


def redact(obj: Any, *, drop: bool = True) -> Any:
    """A copy of `obj` (mappings, lists, strings) without credentials.

    A credential field holding a non-empty string is dropped (`drop`) or its value replaced by
    `<redacted>`; its value is remembered (`remember_secret`) so later free text is scrubbed of it
    too. A credential-named field holding something else (a number, a mapping: e.g. a domain called
    "token" in a results table) is not a credential and is kept. Every other string is `scrub_text`-ed.
    """
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if is_credential_key(key) and isinstance(value, str) and value:
                remember_secret(value)
                if not drop:
                    out[key] = REDACTED
                continue
            out[key] = redact(value, drop=drop)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact(v, drop=drop) for v in obj]
    if isinstance(obj, str):
        return scrub_text(obj)
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with credential values hidden: `--set training.hub_token=X`, `--token X`,
    `--hub-token=X` (the value after a credential-named key or flag becomes `<redacted>`)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and "=" not in arg:
            hide_next = is_credential_key(arg.lstrip("-").replace("-", "_"))
            out.append(arg)
            continue
        key, sep, _ = arg.partition("=")
        if sep and is_credential_key(key.lstrip("-").split(".")[-1].replace("-", "_")):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(scrub_text(arg))
    return out


# ----------------------------------------------------------------------------- pickled arguments
def _reduce_without_credentials(self, protocol):
    """Pickle as the original class, with credential fields set to None (what torch.save(args) writes)."""
    base = type(self).__bases__[0]
    state = {}
    for key, value in self.__dict__.items():
        if is_credential_key(key) and isinstance(value, str):
            remember_secret(value)
            value = None
        state[key] = value
    # copyreg._reconstructor is what pickle itself uses for plain objects: loading needs only the original class.
    return copyreg._reconstructor, (base, object, None), state


def _copy_keeping_credentials(self):
    new = object.__new__(type(self))
    new.__dict__.update(self.__dict__)
    return new


def _deepcopy_keeping_credentials(self, memo):
    new = object.__new__(type(self))
    memo[id(self)] = new
    for key, value in self.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    return new


_SAFE_CLASSES: dict[type, type] = {}


def pickle_without_credentials(args: Any) -> Any:
    """Make every pickle of `args` (e.g. the Trainer's `torch.save(self.args)` into training_args.bin, in
    each checkpoint and in every Hub push) hold no credential, while `args` itself keeps them in memory
    (the Trainer still needs `args.hub_token` to upload).

    The object's class is swapped, in place, for a subclass that differs only in how it pickles: the
    pickle names the original class (loading it needs nothing from hf_dograph) with credential fields
    set to None. `copy.copy` / `copy.deepcopy` keep the credentials. Returns `args`; idempotent.
    """
    cls = type(args)
    if cls in _SAFE_CLASSES.values() or not hasattr(args, "__dict__"):
        return args
    safe = _SAFE_CLASSES.get(cls)
    if safe is None:
        safe = type(cls.__name__, (cls,), {
            "__reduce_ex__": _reduce_without_credentials,
            "__copy__": _copy_keeping_credentials,
            "__deepcopy__": _deepcopy_keeping_credentials,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        })
        _SAFE_CLASSES[cls] = safe
    for key, value in vars(args).items():
        if is_credential_key(key):
            remember_secret(value)
    args.__class__ = safe
    return args


# ----------------------------------------------------------------------------- local paths
def _is_local_path(value: str) -> bool:
    if not isinstance(value, str) or not value or "://" in value:
        return False
    return value.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value) is not None


def public_path(value: str, cwd: str | None = None) -> str:
    """How a local path appears in a public card: relative to the working directory when under it
    (`data/pile`), else its last component (`/home/me/corpora/pile` → `pile`; a glob keeps its folder:
    `/home/me/corpora/pile/*.jsonl` → `pile/*.jsonl`). Other strings are returned unchanged."""
    if not _is_local_path(value):
        return value
    expanded = os.path.expanduser(value)
    cwd = os.path.abspath(cwd or os.getcwd())
    try:
        rel = os.path.relpath(expanded, cwd)
    except ValueError:  # another drive on Windows
        rel = None
    if rel is not None and not rel.startswith(".."):
        return rel.replace(os.sep, "/")
    parts = [p for p in re.split(r"[\\/]", expanded) if p]
    # a glob's last part says little ("*.jsonl"): keep the folder it is in
    if parts and any(c in parts[-1] for c in "*?[") and len(parts) > 1:
        return "/".join(parts[-2:])
    return parts[-1] if parts else value


def public_recipe(raw: Any, cwd: str | None = None) -> Any:
    """A recipe as a model card shows it: no credentials (`redact`), local paths made public (`public_path`)."""
    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return public_path(obj, cwd) if isinstance(obj, str) else obj

    return walk(redact(raw))


def home_relative(raw: Any) -> Any:
    """`raw` with the user's home directory written as `~` in every string (recipes read `~` back)."""
    home = os.path.expanduser("~").rstrip("/\\")
    if not home or home in ("/", "~"):
        return raw

    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, str) and (obj == home or obj.startswith(home + os.sep)):
            return "~" + obj[len(home):]
        return obj

    return walk(raw)
