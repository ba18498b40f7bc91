"""Atomic file writes with the mode a plain ``open()`` gives.

Every output file (GeoJSON, COCO, CSV, heatmaps, overlays, a batch run's records) is written
to a temporary file beside its target and renamed over it only when complete, so an
interrupted writer never leaves a half-written file. ``mkstemp`` creates files 0600; they get
0666 less the umask instead, since shared folders and other processes (dask workers) read them.
The temporary file is named ``.<name>.<random>.tmp<suffix>``: the suffix keeps writers that
choose the format by extension working, and a batch run recognises the name when it removes
what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process's umask. Linux reports it in /proc without changing it; elsewhere it is set
    and restored at once (to 0o077, so a file another thread creates meanwhile is no more
    open than the umask allows for the owner's group and others)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _open_mode(path) -> None:
    """Give a file made by ``mkstemp`` (always 0600) the mode ``open()`` would have given it,
    0666 less the umask."""
    with contextlib.suppress(OSError):  # a file system without modes (some mounts)
        os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; it replaces ``path`` only when the block ends
    without error. The result has the mode a plain ``open()`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _open_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path
