"""Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Everything is first written to a temporary sibling and then moved into place with ``os.replace``,
which is atomic on one file system; on any error, an interrupt included, the temporary is removed.
:func:`building` is the other half: an inter-process lock, so that two processes that need the same
cache entry (chapters executed side by side, test workers) build it once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with ``write(folder)``, then rename it to ``target``.

    If ``target`` appeared meanwhile (another process finished the same work first), keep theirs.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def building(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock for building the cache entry ``path`` (a hidden ``.<name>.lock`` file beside
    it).  Check whether the entry exists *inside* the block: a process that waited for the lock
    then finds what the other one built and loads it instead of building it again."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        yield
