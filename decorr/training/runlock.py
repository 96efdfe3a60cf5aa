"""One run at a time in a run directory: a lock file that a crashed run does not leave stuck.

``RUN_DIR/run.lock`` holds the owner's pid, host and process start time as JSON. The owner writes it to a
temporary file first and makes it visible with ``os.link``, which fails when the lock exists: so of two
runs started into one directory exactly one gets it, and the lock file is never seen empty or half written.
A lock whose owner is on this host and no longer alive (its pid is gone, or now belongs to a process that
started later) is taken over; a lock held by a live process, or by another host (whose processes cannot be
checked from here), stops the new run with a one-line error. An unreadable or empty lock (written by
something else, or by an older version that wrote it after creating it) counts as held until it is
``STALE_UNREADABLE_S`` seconds old. Taking over happens under an ``flock`` on ``RUN_DIR/.run.lock.takeover``,
so two runs that both find a dead owner cannot both take its place.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from decorr.errors import DecorrError

LOCK_FILE = "run.lock"
#: Seconds after which an unreadable (empty, truncated, not JSON) lock is taken as junk rather than being written.
STALE_UNREADABLE_S = 60.0

__all__ = ["LOCK_FILE", "STALE_UNREADABLE_S", "RunLock"]


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
        """Make the lock file appear whole, or return False when it exists."""
        text = json.dumps(self._record()) + "\n"
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            return True
        except FileExistsError:
            return False
        except OSError:
            # A filesystem without hard links: exclusive creation, then the record (readers take an
            # unreadable lock as held while it is young, so the moment it is empty does no harm).
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> tuple[str | None, float]:
        """The lock file's text (None: no lock) and its age in seconds."""
        try:
            with open(self.path, "rb") as handle:
                age = time.time() - os.fstat(handle.fileno()).st_mtime
                return handle.read().decode("utf-8", "replace"), age
        except FileNotFoundError:
            return None, 0.0

    def owner(self) -> dict[str, Any] | None:
        """The lock's record; None when there is no lock, {} when it cannot be read."""
        try:
            text, _ = self._read()
        except OSError:
            return {}
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _takeover_guard(self) -> Iterator[None]:
        """Exclusive among the processes of this host that take over a lock of this directory."""
        import fcntl

        fd = os.open(self.run_dir / f".{LOCK_FILE}.takeover", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _in_use(self, owner: dict[str, Any]) -> DecorrError:
        same_host = owner.get("host") == socket.gethostname()
        where = "" if same_host else f" on host {owner.get('host')}"
        return DecorrError(
            f"{self.run_dir} is in use by another run (pid {owner.get('pid')}{where}, since "
            f"{owner.get('time')}); wait for it to finish or choose another --run-dir"
            + ("" if same_host else f" (delete {self.path} if that run is gone)")
        )

    def _holds(self, text: str, age: float) -> DecorrError | None:
        """The error to raise when the lock with this text is held; None when its owner is gone."""
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict) or not owner:
            if age < STALE_UNREADABLE_S:  # being written by another process, or junk that is still young
                return DecorrError(
                    f"{self.run_dir} is in use by another run (its lock {self.path} is being written or cannot be "
                    f"read); wait for that run, or delete {self.path} if no run uses the directory")
            return None
        same_host = owner.get("host") == socket.gethostname()
        return self._in_use(owner) if not same_host or _alive(owner) else None

    def acquire(self) -> None:
        """Take the lock or raise DecorrError; a dead owner's lock on this host is taken over."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                if self._create():
                    self.held = True
                    return
                text, age = self._read()
                if text is None:
                    continue  # released in between: try again
                refusal = self._holds(text, age)
                if refusal is not None:
                    raise refusal
                # The owner is dead (or the file is old junk): remove it, unless it changed meanwhile.
                with self._takeover_guard():
                    again, _ = self._read()
                    if again == text:
                        self.path.unlink(missing_ok=True)
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
