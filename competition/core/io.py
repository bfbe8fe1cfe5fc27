"""Atomic file writing: temp file in the same folder, then rename; never overwrite by accident."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

T, R = TypeVar("T"), TypeVar("R")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    """Give a finished temp file the usual permissions (mkstemp makes 0600) and rename it onto ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex, first 16 digits) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a folder tree, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class OutputExistsError(FileExistsError):
    """An output file already exists and overwriting was not asked for."""


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to replace an existing file unless ``overwrite``; create the parent folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    The temp name keeps the suffix (some writers pick the format from it) and starts with a dot.
    """
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _publish(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite)


def atomic_write_csv(path: str | os.PathLike, frame: pd.DataFrame, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False), overwrite)


class NpzStreamWriter:
    """Write arrays one by one into an ``.npz`` (readable with ``np.load``) without holding them all, then
    rename it into place; on an exception the partial file is removed and ``path`` is untouched."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = True):
        self.path = check_writable(path, overwrite)

    def __enter__(self) -> NpzStreamWriter:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.npz", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1)
        return self

    def put(self, name: str, array: np.ndarray) -> None:
        with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def __exit__(self, kind, *rest) -> None:
        self.zip.close()
        if kind is None:
            _publish(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def read_ahead(
    read: Callable[[T], R], items: Iterable[T], workers: int, depth: int | None = None
) -> Iterator[R]:
    """``read(item)`` of every item, in order, with up to ``depth`` (default ``2 * workers``) of them read
    ahead by ``workers`` threads: decompression (zlib) and numpy release the GIL, so files are read on every
    core while the caller works on what came before. ``workers <= 1``: plain, in this thread."""
    if workers <= 1:
        yield from map(read, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= (depth or 2 * workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def usable_cores() -> int:
    """Cores this process may run on (``OOF_WORKERS`` overrides it for the OOF tools)."""
    if os.environ.get("OOF_WORKERS"):
        return max(1, int(os.environ["OOF_WORKERS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temp folder beside ``path``, renamed onto it when the block succeeds and removed when it fails, so
    ``path`` is either the whole result or untouched. An existing ``path`` needs ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them (a no-op off the main thread), so
    that files written together (an epoch's best weights, ``metrics.csv`` and ``last.ckpt``) are all
    written or none. (Handlers, not a signal mask: torch's threads would take a masked signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])
