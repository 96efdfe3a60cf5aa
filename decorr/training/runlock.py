"""One run at a time in a run directory: a lock file that a crashed run does not leave stuck.

``RUN_DIR/run.lock`` holds the owner's pid, host and process start time as JSON. It is created with
``O_CREAT | O_EXCL``, so of two runs started into one directory exactly one gets it. A lock whose owner
is on this host and no longer alive (its pid is gone, or now belongs to a process that started later)
is taken over; a lock held by a live process, or by another host (whose processes cannot be checked
from here), stops the new run with a one-line error.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from decorr.errors import DecorrError

LOCK_FILE = "run.lock"

__all__ = ["LOCK_FILE", "RunLock"]


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None where /proc is absent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _alive(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = owner.get("started")
    # A recycled pid belongs to a process that started after the lock's owner did.
    return started is None or _process_start_time(pid) in (None, started)


class RunLock:
    """The lock of one run directory; :meth:`acquire` it before writing anything there."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held = False

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": _process_start_time(pid),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self._record(), handle)
            handle.write("\n")
        return True

    def owner(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> None:
        """Take the lock or raise DecorrError; a dead owner's lock on this host is taken over."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                if self._create():
                    self.held = True
                    return
                owner = self.owner()
                if owner is None:
                    continue  # released in between: try again
                same_host = owner.get("host") == socket.gethostname()
                if owner and (not same_host or _alive(owner)):
                    where = "" if same_host else f" on host {owner.get('host')}"
                    raise DecorrError(
                        f"{self.run_dir} is in use by another run (pid {owner.get('pid')}{where}, since "
                        f"{owner.get('time')}); wait for it to finish or choose another --run-dir"
                        + ("" if same_host else f" (delete {self.path} if that run is gone)")
                    )
                # The owner is dead (or the file is unreadable junk): take over atomically.
                stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
        except PermissionError as err:
            raise DecorrError(
                f"cannot write to run directory {self.run_dir} ({err.strerror}); choose a writable --run-dir"
            ) from None
        except OSError as err:
            raise DecorrError(f"cannot create run directory {self.run_dir} ({err.strerror}); choose another --run-dir") from None
        raise DecorrError(f"could not take the lock {self.path}; another run keeps taking it; choose another --run-dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass
