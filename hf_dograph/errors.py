"""Errors about things the user handed in (files, folders), worded for a person.

Every message is one line: what is wrong, where (the file, and the line when there is one) and
the fix. The command line prints it as is, without a traceback (see `cli.main`).
"""

from __future__ import annotations

import os


def one_line(text: str) -> str:
    """`text` on one line (a message may quote a value that holds line breaks)."""
    return " ".join(str(text).split())


class InputFileError(ValueError):
    """A file the project reads is missing, truncated or malformed.

    `path` is the file; `line` (1-based) and `column` / `byte_offset` say where, when known; `fix` is
    what the user should do. A `ValueError`, so code that caught the old errors still catches these.
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str, *, line: int | None = None,
                 column: int | None = None, byte_offset: int | None = None):
        self.path = str(path)
        self.line, self.column, self.byte_offset = line, column, byte_offset
        self.problem, self.fix = problem, fix
        where = self.path
        if line is not None:
            where += f", line {line}"
            if column is not None:
                where += f", column {column}"
        if byte_offset is not None:
            where += f" (byte offset {byte_offset})"
        super().__init__(one_line(f"{where}: {problem}. Fix: {fix}"))


class NonFiniteTrainingError(RuntimeError):
    """Training produced no usable (finite) sample for `nonfinite_step_limit` optimizer steps in a row, or a
    model with NaN/inf parameters was about to be saved. The message names the step, the parameters and what
    to check; the command line prints it as one line."""
