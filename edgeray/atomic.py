"""Atomic file writes: readers see the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_dir_atomic(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Publish a directory without ever exposing a half-written one: ``fill(tmp)`` writes it beside
    ``path``, every file is fsynced, then it is renamed into place. A crash between the two renames leaves
    the previous directory complete at ``.<name>.old``, which :func:`latest_dir` finds; a leftover
    ``.old`` never blocks a later write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier crash: ``path`` is complete
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def latest_dir(path: str | Path) -> Path | None:
    """The last complete directory published at ``path`` by :func:`write_dir_atomic`: the directory itself
    or, after a crash between its two renames, the previous one kept at ``.<name>.old``; None when
    neither."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(f".{path.name}.old")
    return old if old.is_dir() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file under ``root`` and every directory entry reaches the disk before the rename that
    publishes them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
