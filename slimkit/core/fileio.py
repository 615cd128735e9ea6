"""Atomic, no-clobber file writes shared by checkpoints, exports and reports."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from slimkit.core.errors import SlimkitError

__all__ = ["check_output", "atomic_write", "sha256_of"]


def check_output(path: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse early (before any work) an output that exists without ``force``, cannot be written, or is
    one of the command's ``inputs`` (even with ``force``: nothing of the user's is overwritten)."""
    path = Path(path)
    for src in inputs:
        if path.resolve() == Path(src).resolve():
            raise SlimkitError(f"output {path} is the input {src}; choose another output path")
    if path.is_dir():
        raise SlimkitError(f"output {path} is a directory; give a file path")
    if path.exists() and not force:
        raise SlimkitError(f"output {path} already exists; pass --force to overwrite it or -o to choose another path")
    if not path.parent.is_dir():
        raise SlimkitError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None], force: bool = False) -> Path:
    """Call ``writer(tmp)`` on a temporary file beside ``path``, then move it into place.

    Readers never see a half-written file. Without ``force`` an existing file is never replaced,
    even one that appeared while we were writing (hard link is an atomic no-clobber rename).
    """
    path = check_output(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise SlimkitError(f"output {path} already exists; pass --force to overwrite it") from exc
            except OSError as exc:  # filesystems without hard links: best effort
                if path.exists():
                    raise SlimkitError(f"output {path} already exists; pass --force to overwrite it") from exc
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
