"""Writing results so that a killed process never leaves a half-written one that looks complete.

A file or folder is written under a temporary name beside its destination and renamed into place
(``os.replace`` is atomic on one file system): the destination is either absent, the old version, or the
complete new one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let ``write(folder)`` fill a temporary folder beside ``path``, then rename it to ``path``.

    An existing ``path`` is replaced only once the new folder is complete. A failure (or a kill) leaves at most
    a ``.<name>.partial-<pid>`` folder, which no loader mistakes for ``path``; a failure removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
