"""Files on disk: atomic writes, and loads that never unpickle arbitrary objects.

Everything (``torch.save`` payloads, a run's config, the benchmark's JSON) is written to a
temporary file in the same folder, flushed to disk and renamed over the destination, so a crash
mid-write never leaves a half-written file under the real name. Loads use
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers, and turn
every failure into a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(ValueError):
    """A model or checkpoint file that is missing, truncated, corrupt or from another model."""


def _process_umask() -> int:
    umask = os.umask(0)  # the only way to read it: set and restore, once, at import
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temporary file beside ``path``, then an atomic rename onto it; the
    file and the rename are flushed to disk before it returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # the permissions open() would give, not mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` via a temporary file and an atomic rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8) via a temporary file and an atomic rename."""
    atomic_write(path, lambda f: f.write(text.encode()))


def safe_load(path: str | Path, kind: str | tuple[str, ...],
              map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load a dict written by :func:`atomic_save` whose ``"format"`` entry is ``kind`` (or one
    of the kinds given). ``mmap``: tensors are mapped from the file, not read (to look at a
    checkpoint's small entries cheaply)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    kind = " or ".join(kinds)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, not "
                              f"a {kind} file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        raise CheckpointError(f"{path}: truncated or corrupt, or not a {kind} file at all "
                              "(it is not the zip archive torch.save writes)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for bad zip/pickle data
        raise CheckpointError(
            f"{path}: cannot be read as a {kind} file; it is truncated or corrupt ({error})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") not in kinds:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a {kind} file (format: {found!r})")
    return payload


def check_can_create(path: str | Path, folder: bool = False) -> Path:
    """Refuse, before any work, a path that could not be written at the end: a folder where a
    file is to go (or a file where a folder is to go), or a parent that is a file."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{path} is a {'file' if folder else 'folder'}; give a "
                         f"{'folder' if folder else 'file name'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: {parent} is a file, not a folder")
            break
    return path


def load_state(target: Any, state: Any, path: str | Path) -> None:
    """``target.load_state_dict(state)`` (a module or an optimiser), as a CheckpointError naming
    the file if the saved tensors do not fit: a file edited by hand, or one whose config does
    not describe its weights."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())[:400]
        raise CheckpointError(f"{path}: its saved state does not fit the {type(target).__name__} "
                              f"its config describes: {detail}") from error
