"""Files written so that a crash, a kill or a power cut never leaves a torn one where a reader looks.

`replace_atomically` writes a file whole beside its destination, forces it to disk and renames it over the old one
(a rename within one folder is atomic); `sync` forces a file, or a directory's renames, to disk. The checkpoints,
``save_pretrained``, the token cache, ``metrics.csv`` and the benchmarks' result files are written through them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_atomically", "sync"]


def sync(path: Path) -> None:
    """Force a file, or a directory's entries (renames), to disk where the platform allows it.

    A file is opened for writing: Windows syncs nothing through a read-only handle. Directories cannot be opened on
    Windows, where renames are durable anyway, and a file system that cannot sync (some network mounts) is left as it
    is: there is nothing better to do.
    """
    flags = os.O_RDONLY if path.is_dir() else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[Path], object], temporary: Path | None = None) -> Path:
    """Replace `path` with what `write` writes into `temporary` (``<name>.tmp<pid>`` beside it unless given).

    The temporary file is on disk before the rename that publishes it: otherwise the rename can reach the disk first
    and a power cut leaves an empty file under `path`. A failure or an interrupt (Ctrl-C) removes the temporary file,
    which may be large, and leaves `path` as it was. Returns `path`.
    """
    temporary = temporary if temporary is not None else path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        sync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
