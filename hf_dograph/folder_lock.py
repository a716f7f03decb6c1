"""One run at a time per output folder: a lock file holding the owner's pid and host.

`FolderLock(folder).acquire()` creates `folder/_hf_dograph.lock` (the leading underscore keeps it
out of every Hub push, ours and the Trainer's) and writes `{"pid", "host", "started", "command"}`
into it; `release()` removes it. Both `hf-dograph train` and `DoGraphTrainer.train()` hold it for
the whole run (see `run_folder.claim_output_dir`), so a second run into the same folder is refused
while the first one is alive:

- The file is also locked with `fcntl.flock` where the OS has it. The kernel drops that lock when
  the owner dies however it dies (kill -9 included), so "is the owner still running?" has an exact
  answer on this machine, with no race between two runs starting at once.
- A lock file left by a dead process on this host (its pid is gone, or the flock is free) is stale:
  it is taken over, with a warning naming the dead owner.
- A lock file written on another host is never taken over automatically (its pid means nothing
  here): the message says to delete it if that run has ended.
- Within one process the lock is re-entrant (the CLI holds it and the trainer it runs takes it
  again); it is released when the outermost holder releases it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path

from .errors import one_line
from .redaction import redact_argv

try:  # POSIX; elsewhere the pid check alone decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = "_hf_dograph.lock"
_held: dict[str, "FolderLock"] = {}  # resolved folder -> the lock this process holds on it


class FolderLockedError(RuntimeError):
    """Another live run holds the output folder; the message names the folder, the owner and the fix."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _owner_text(info: dict | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


class FolderLock:
    """The lock of one output folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._depth = 0
        self._outer: FolderLock | None = None  # the instance that holds the lock, when another one took it first
        self._borrowed = 0  # how many of our acquires were counted on `_outer`

    # ------------------------------------------------------------------ public
    def acquire(self) -> "FolderLock":
        """Take the lock (re-entrant within the process); `FolderLockedError` if a live run holds it."""
        key = str(self.folder.resolve())
        mine = _held.get(key)
        if mine is not None:  # this process holds it already: count, and let `release` hand it back there
            mine._depth += 1
            if mine is not self:
                self._outer = mine
                self._borrowed += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when the file changed under us (an owner releasing it)
            if self._try_acquire():
                self._depth = 1
                _held[key] = self
                return self
        raise FolderLockedError(one_line(
            f"could not lock {self.folder}: its lock file {self.path} keeps changing; is another run starting "
            "there? Wait for it, or use another output folder"))

    def release(self) -> None:
        """Give the lock back; the lock file is removed when the outermost holder releases it."""
        if self._outer is not None:
            outer = self._outer
            self._borrowed -= 1
            if not self._borrowed:
                self._outer = None
            outer.release()
            return
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        _held.pop(str(self.folder.resolve()), None)
        fd, self._fd = self._fd, None
        try:
            if fd is not None and self._same_file(fd):
                os.unlink(self.path)  # before unlocking: a waiting process then finds no file, not ours
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _same_file(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def _read(self, fd: int) -> dict | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
            info = json.loads(data.decode("utf-8"))
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def _refuse(self, info: dict | None) -> FolderLockedError:
        same_host = bool(info) and info.get("host") == socket.gethostname()
        fix = ("wait for it to finish or stop it, or train into another folder (--output-dir / output_dir)"
               if same_host or not info else
               f"if that run has ended (it ran on another machine, so its pid cannot be checked here), delete "
               f"{self.path}; else wait for it or train into another folder (--output-dir / output_dir)")
        return FolderLockedError(one_line(
            f"{self.folder} is in use by another run: {_owner_text(info)} holds {self.path}. Fix: {fix}"))

    def _try_acquire(self) -> bool:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise FolderLockedError(one_line(
                f"cannot create the lock file {self.path} ({err.strerror}). Fix: make {self.folder} writable, "
                "or train into another folder")) from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._refuse(self._read(fd)) from None
                if not self._same_file(fd):  # its owner removed it between our open and our flock: retry
                    os.close(fd)
                    return False
            previous = self._read(fd)
            if previous and not self._stale(previous):
                raise self._refuse(previous)
            if previous:
                logger.warning(
                    "%s: taking over a stale lock left by %s, which is no longer running (killed?). Files it was "
                    "writing may be incomplete.", self.folder, _owner_text(previous),
                )
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def _stale(self, info: dict) -> bool:
        """A previous owner's lock that may be taken over: written on this host by a process now gone."""
        if info.get("host") != socket.gethostname():
            return False
        pid = int(info.get("pid") or 0)
        if pid == os.getpid():
            return True  # our own leftover (a lock object dropped without release)
        # With flock held by us now, the previous owner cannot be alive (a live one would hold it):
        # its pid may have been reused by an unrelated process.
        return fcntl is not None or not pid_alive(pid)

    def _write(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            # `--set training.hub_token=...` stays out of the file
            "command": " ".join(redact_argv([os.path.basename(sys.argv[0])] + sys.argv[1:]))[:300] if sys.argv else "",
        }
        data = json.dumps(info, allow_nan=False).encode("utf-8")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)
