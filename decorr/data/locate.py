"""Where datasets live: the folders searched (``root``, ``$DECORR_DATA_ROOT``, ``./data``), the error that
lists them, and torchvision downloads under a per-host file lock that leave no litter when they fail.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable


from decorr.errors import DecorrError
from decorr.data.base import PathLike

__all__ = ["DATA_ROOT_ENV", "DEFAULT_DOWNLOAD_ROOT", "DOWNLOAD_SOCKET_TIMEOUT_S", "search_roots"]


#: Environment variable with extra data folders (``os.pathsep``-separated), searched after ``root``.
DATA_ROOT_ENV = "DECORR_DATA_ROOT"
#: torchvision's usual download root, relative to the working directory.
DEFAULT_DOWNLOAD_ROOT = Path("data")
#: Per-operation socket timeout around a download attempt, so that an offline machine whose network
#: drops packets (rather than failing DNS at once) does not hang; generous enough for real downloads.
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0



# ----------------------------------------------------------------------------------------------
# Where data lives


def search_roots(root: PathLike | None = None) -> list[Path]:
    """The data roots searched, in order: ``root``, ``$DECORR_DATA_ROOT`` entries, ``./data``."""
    roots: list[Path] = []
    if root is not None:
        roots.append(Path(root))
    roots += [Path(p) for p in os.environ.get(DATA_ROOT_ENV, "").split(os.pathsep) if p.strip()]
    roots.append(DEFAULT_DOWNLOAD_ROOT)
    return _unique([Path(os.path.abspath(os.path.expanduser(r))) for r in roots])


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))  # first occurrence wins, order kept


def _candidate_folders(
    root: PathLike | None, layouts: Sequence[str], system: Sequence[str] = ()
) -> list[Path]:
    folders = [r / layout if layout else r for r in search_roots(root) for layout in layouts]
    return _unique(folders + [Path(s) for s in system])


def _not_found(
    name: str, looked_in: Sequence[Path], how: str, download_error: str | None, skipped: Sequence[str] = ()
) -> DecorrError:
    attempt = f"; the download failed ({download_error})" if download_error else ""
    ignored = f" (ignored: {'; '.join(skipped)})" if skipped else ""
    return DecorrError(
        f"dataset {name!r} not found; looked in: {', '.join(map(str, looked_in))}{ignored}{attempt}; "
        f"to get it: {how}, "
        f"or point --data-root DIR / ${DATA_ROOT_ENV} (or root=) at a folder that holds it"
    )


def _short_error(err: BaseException) -> str:
    from decorr.errors import short_reason

    return short_reason(f"{type(err).__name__}: {short_reason(err, 400)}", 200)


@contextlib.contextmanager
def _download_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock for downloads into ``folder``, shared by the processes of this host.

    The lock file lives in the temporary folder, not in ``folder``, so that a failed download still
    leaves the data folder as it was.
    """
    import fcntl
    import hashlib
    import tempfile

    key = hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"decorr-download-{key}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(
    name: str, root: PathLike | None, fetch: Callable[[Path], None], created: Sequence[str]
) -> str | None:
    """Run torchvision's downloader ``fetch(download_root)``; return None, or why it failed.

    One process at a time: a file lock in the download root makes the processes of a data-parallel
    run (or two runs) that all miss the data wait while the first downloads and extracts; the others
    then find the files (torchvision's downloaders verify and skip what is already there).
    On failure, the empty folders the attempt created (``created``, relative to the download root)
    are removed again, so that an offline attempt leaves no litter in ``./data``.
    """
    download_root = Path(os.path.abspath(root if root is not None else DEFAULT_DOWNLOAD_ROOT))
    folders = [download_root] + [download_root / c for c in created]
    for c in created:
        parts = Path(c).parts
        folders += [download_root.joinpath(*parts[:i]) for i in range(1, len(parts))]
    new_folders = sorted({f for f in folders if not f.exists()}, key=lambda f: len(f.parts), reverse=True)
    previous_timeout = socket.getdefaulttimeout()
    try:
        if previous_timeout is None:
            socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
        with _download_lock(download_root):
            fetch(download_root)
        return None
    except Exception as err:  # noqa: BLE001 - URLError, RuntimeError, OSError, timeouts: all "no data"
        for folder in new_folders:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        return _short_error(err)
    finally:
        socket.setdefaulttimeout(previous_timeout)
