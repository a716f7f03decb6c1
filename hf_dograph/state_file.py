"""The `dograph_state.json` file: its name, format and version, writing and reading it, tensors inside it.

What goes into the state, and how a trainer is restored from it, is `checkpointing.py`'s; this module only
knows the file, so that anyone reading a run folder (the model card, the plots) needs no trainer.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import torch

DOGRAPH_STATE_NAME = "dograph_state.json"
STATE_FORMAT = "hf_dograph.dograph_state"
STATE_VERSION = 1


def write_state_file(output_dir: str | os.PathLike, state: dict) -> Path:
    """Write `state` as `output_dir/dograph_state.json` (the folder created if needed); returns its path."""
    from .jsonfiles import write_json

    # Strict JSON, written then renamed (a run killed mid-write never leaves a truncated state beside good
    # weights), compact: the history and the domain model's window make long runs' files a few MB.
    return write_json(Path(output_dir) / DOGRAPH_STATE_NAME, state, compact=True)


def load_dograph_state(path: str | os.PathLike) -> dict:
    """Read a `dograph_state.json` (or the one inside a folder).

    A file that is missing, truncated, garbled or not a DoGraph state raises `InputFileError` (a
    `ValueError`) naming the file, the line and the fix.
    """
    from .errors import InputFileError
    from .jsonfiles import read_json

    p = Path(path)
    if p.is_dir():
        p = p / DOGRAPH_STATE_NAME
    fix = (f"resume from another checkpoint-N (resume_from_checkpoint=True picks the last complete one), or delete "
           f"{p} to resume with DoGraph's state started afresh (weights, optimizer and schedule are still restored)")
    state = read_json(p, fix=fix, what="DoGraph state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputFileError(p, f"not a DoGraph state file (format {found!r}, expected {STATE_FORMAT!r})", fix)
    if int(state.get("version", 0)) > STATE_VERSION:
        raise InputFileError(
            p, f"written by a newer hf_dograph (state version {state['version']} > {STATE_VERSION})",
            "upgrade hf_dograph (pip install -U hf_dograph)",
        )
    return state


def encode_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    """{name: {dtype, shape, data}} with the raw bytes in base64: exact, and the state stays one JSON file."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        out[name] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                     "data": base64.b64encode(t.numpy().tobytes()).decode("ascii")}
    return out


def decode_tensors(encoded: dict) -> dict[str, torch.Tensor]:
    import numpy as np

    out = {}
    for name, spec in (encoded or {}).items():
        arr = np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out
