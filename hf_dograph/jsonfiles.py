"""Every JSON file hf_dograph writes or reads back goes through here.

Writing: strict JSON only (`allow_nan=False`): a non-finite float becomes `null`, since `NaN` and
`Infinity` are not JSON and other tools (the Hub's viewer, `jq`, JavaScript) reject the file.
Credentials are removed first (`redaction.redact`), so no writer can leak one by accident. Files
are written to a temporary name and renamed, so a run killed mid-write never leaves half a file.

Reading: a file that is not valid JSON raises `InputFileError` naming the file, the line and
column, and the fix, instead of a bare `JSONDecodeError`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import InputFileError
from .redaction import redact


def finite_or_null(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, recursively (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = 2, compact: bool = False, **kwargs) -> str:
    """Strict JSON text of `obj` without credentials (see the module docstring)."""
    separators = (",", ":") if compact else None
    return json.dumps(finite_or_null(redact(obj)), indent=None if compact else indent, separators=separators,
                      allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, compact: bool = False,
               **kwargs) -> Path:
    """Write `obj` as strict JSON to `path` (parents created; write-then-rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(obj, indent=indent, compact=compact, **kwargs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + ("" if compact else "\n"), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, *, fix: str, what: str = "file") -> Any:
    """The parsed content of a JSON file; `InputFileError` (file, line, column, `fix`) when it is not JSON.

    `what` names the file's role in the message ("DoGraph state", "trainer state"...).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(path, f"the {what} is missing", fix) from None
    except OSError as err:
        raise InputFileError(path, f"the {what} cannot be read ({err.strerror or err})", fix) from None
    if not data.strip():
        raise InputFileError(path, f"the {what} is empty (the run was probably stopped while writing it)", fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputFileError(path, f"the {what} is not UTF-8 text (byte 0x{data[err.start]:02x}): it is garbled",
                             fix, line=line, byte_offset=err.start) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # Cut short: the parser ran out of text (or inside a string that never closes), not into a wrong character.
        cut = err.pos >= len(text.rstrip()) or (err.msg.startswith("Unterminated string") and "\n" not in text[err.pos:])
        problem = (f"the {what} ends before its JSON does ({err.msg}): it was cut short" if cut
                   else f"the {what} is not valid JSON ({err.msg})")
        raise InputFileError(path, problem, fix, line=err.lineno, column=err.colno) from None
