"""Atomic file writes and the standalone task-file format (one task's factors and keys as safetensors)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TASK_FILE_FORMAT = "peft_lpi.task"
TASK_FILE_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or task file is missing, corrupt, truncated, foreign or incompatible."""


def _raise_disk_error(err: OSError, path: Path) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(err.errno, f"No space left on the device while writing {path}; nothing was replaced. "
                      "Free some space or choose another output directory.") from err
    raise err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically (os.replace).

    An interrupted or failing write leaves the previous file untouched and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        _raise_disk_error(err, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it takes the place of `path`.

    The old directory is moved aside first and deleted only after the new one is in place, so at every moment
    either the old or the new complete directory exists (a crash in between leaves `<path>.old-*`, still loadable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_error(err, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
        old.rmdir()
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_directory(path: str | os.PathLike) -> Path | None:
    """Repair what a killed `atomic_directory` swap can leave behind; call it before reading `path` (no writer active).

    A process killed between the two renames of the swap leaves no `path` but a complete `<path>.old-*`: the newest
    one is moved back (the write that was being committed is lost, the previous one survives). Temporary folders of
    writes that never finished (`.<name>.*.tmp`) and `<path>.old-*` folders left next to a complete `path` are
    removed. Returns the restored folder, or None when nothing had to be restored.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return None
    olds = sorted(path.parent.glob(f"{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    restored = None
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
        restored = path
    for leftover in olds + list(path.parent.glob(f".{path.name}.*.tmp")):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return restored


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_task_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a task file, refusing missing, corrupt, truncated and foreign files with a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Task file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers and truncation
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from None
    if metadata.get("format") != TASK_FILE_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a peft_lpi task file (metadata format="
            f"{metadata.get('format')!r}, expected {TASK_FILE_FORMAT!r}). Write task files with `model.save_task`."
        )
    version = int(metadata.get("format_version", "0"))
    if version > TASK_FILE_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer peft_lpi (task format {version}, this install reads up to "
            f"{TASK_FILE_VERSION}). Upgrade peft_lpi."
        )
    return tensors, metadata
