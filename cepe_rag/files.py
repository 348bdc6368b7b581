"""Writing files so that an interruption never leaves half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename: a reader sees the old file or the new one, never half of one."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write_with(path, write)


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """`write(temporary_path)` writes the new file (a library that opens the file by name, such as
    `faiss.write_index`, streams it there without a copy in memory); it is then synced and renamed over `path`,
    so a reader, or a memory-mapping of the old file, sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp creates 0600, and a writer may recreate the file (safetensors' save_file does): normal permissions
        os.chmod(tmp, 0o666 & ~umask)
        synced = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(synced)
        finally:
            os.close(synced)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(folder: Path) -> None:
    """Make the rename itself durable (POSIX); where a folder cannot be opened, the rename is still atomic."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
