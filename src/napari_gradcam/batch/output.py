"""The output folder: one run at a time, one set of settings.

A run holds an exclusive lock on OUT/.napari-gradcam/lock for as long as it writes, so that two
runs never interleave their files. OUT/.napari-gradcam/run.json holds the settings that made the
results; a rerun with other settings is refused before any model runs unless it may redo
everything (overwrite). OUT/.napari-gradcam/names.json maps each output name to the source it
belongs to, so that a source keeps its name across runs and same-named sources never share one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write
from .discover import Unit, _resolved, name_units
from .records import STATE_DIR
from .settings import _digest, other_command, settings_changes


RUN_FILE = "run.json"
NAMES_FILE = "names.json"
LOCK_FILE = "lock"
# how files.atomic_output names its temporary files (what a killed run may leave)
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
_HELD: dict[str, "Run"] = {}  # output folders this process holds, by resolved path


class OutputInUse(ValueError):
    """Another process is writing into the output folder."""


class SettingsChanged(ValueError):
    """The output folder holds results made with other settings."""


@dataclass
class Run:
    """This process's hold on an output folder: the settings digest every record carries and
    the folder's names index."""

    out: Path
    settings: dict
    digest: str
    claims: dict
    _lock_fd: int = -1

    def name(self, units: list[Unit]) -> list[Unit]:
        """``units`` under the names this folder knows their sources by (new sources get
        free names, recorded before any of their files is written)."""
        units, claims = name_units(units, self.claims)
        if claims != self.claims:
            self.claims = claims
            atomic_write(self.out / STATE_DIR / NAMES_FILE,
                          json.dumps(claims, indent=1, sort_keys=True))
        return units


def check_output(out, inputs: Iterable = ()) -> Path:
    """Refuse, before anything is written, an output folder that is a file, can't be created
    or written, or is (or holds) one of the inputs, whose outputs would be read back as
    inputs. An output folder inside an input folder is fine: the search leaves it out."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; give a folder to write "
                         "into (it is created if missing).")
    ancestor = out.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {str(out)!r} can't be created: {str(ancestor)!r} is a file, "
                         "not a folder; give a folder path.")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (
            (out / STATE_DIR).is_dir() and not os.access(out / STATE_DIR, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {str(out)!r} is not writable (no write permission on "
                         f"{str(ancestor)!r}); give a folder you can write into.")
    real = Path(_resolved(out))
    for item in inputs:
        src = Path(_resolved(item))
        if src == real or real in src.parents:
            where = "is" if src == real else "lies inside"
            raise ValueError(f"input {str(item)!r} {where} --out {str(out)!r}, so the "
                             "outputs would be read back as inputs; give --out a folder of "
                             "its own (a subfolder of an input folder is fine).")
    return out


def held_run(out) -> Run | None:
    """The hold this process has on ``out``, if any."""
    return _HELD.get(_resolved(out))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is damaged ({err}); delete it to start the output "
                         "folder afresh, or use a new --out.") from None


def _refuse_changed(out: Path, settings: dict, overwrite: bool) -> bool:
    """Raise SettingsChanged if ``out`` holds results of other settings (unless
    ``overwrite``); True when run.json must be (re)written."""
    old = _read_json(out / STATE_DIR / RUN_FILE)
    if old is None:
        return True
    old_settings = old.get("settings", {}) if isinstance(old, dict) else {}
    if _digest(old_settings) == _digest(settings):
        return False
    if not overwrite:
        other = other_command(out, old_settings, settings)
        if other:
            raise SettingsChanged(other)
        changes = settings_changes(old_settings, settings) or ["the settings' format"]
        raise SettingsChanged(
            f"{str(out)!r} holds results made with other settings ({'; '.join(changes)}); "
            "pass --overwrite to redo every input with the new settings, or use a new --out.")
    return True


def _lock(out: Path) -> int:
    """An exclusive, non-blocking lock on OUT/.napari-gradcam/lock, which then names this
    process; OutputInUse naming the holder if another process has it. The lock goes with the
    process: the system releases it when the process ends, however it ends."""
    path = out / STATE_DIR / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock(fd)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}" if holder else "another process")
        raise OutputInUse(f"{str(out)!r} is in use by another napari-gradcam run ({who}); "
                          "wait for it to finish, or use another --out.") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _flock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # while still held: the next holder writes its own name
    with contextlib.suppress(OSError):
        try:
            import fcntl
        except ImportError:
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _remove_stale_temps(out: Path) -> None:
    """Delete the temporary files a killed run of ours left: only while holding the lock (no
    run of ours is writing), only where we write, only files named as ours."""
    ours = {"heatmaps", "geojson", "overlays", "regions", "segmentation",
            f"{STATE_DIR}/records"}
    top = {"summary.csv", "coco.json", f"{STATE_DIR}/{RUN_FILE}", f"{STATE_DIR}/{NAMES_FILE}"}
    for folder in (*ours, ".", STATE_DIR):
        with contextlib.suppress(OSError):
            for stale in (out / folder).iterdir():
                if not _TEMP.match(stale.name) or not stale.is_file() or stale.is_symlink():
                    continue
                if folder not in ours and not any(
                        stale.name.startswith(f".{Path(t).name}.") for t in top
                        if str(Path(t).parent) == folder):
                    continue
                with contextlib.suppress(OSError):
                    stale.unlink()


@contextlib.contextmanager
def claim_output(out, settings: dict, *, overwrite: bool = False) -> Iterator[Run]:
    """Hold the output folder for one run: refuse at once (ValueError, nothing written) when
    it is not a writable folder, holds results of other settings (unless ``overwrite``) or
    another process writes into it; then record the settings, delete our own stale temporary
    files and yield the :class:`Run`. The lock is released when the block ends, however it
    ends (an exception, Ctrl-C)."""
    out = check_output(out)
    key = _resolved(out)
    if key in _HELD:
        raise OutputInUse(f"{str(out)!r} is already being written by this process; use "
                          "another --out.")
    _refuse_changed(out, settings, overwrite)  # before creating or locking anything
    try:
        (out / STATE_DIR / "records").mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
    except OSError as err:
        raise ValueError(f"can't write into --out {str(out)!r} ({err.strerror or err}); give "
                         "a folder you can write into.") from None
    try:
        if _refuse_changed(out, settings, overwrite):  # again, now that no one else writes
            atomic_write(out / STATE_DIR / RUN_FILE,
                          json.dumps({"settings": settings}, indent=1, sort_keys=True))
        _remove_stale_temps(out)
        claims = _read_json(out / STATE_DIR / NAMES_FILE) or {}
        if not isinstance(claims, dict):
            claims = {}
        run = Run(out, settings, _digest(settings), claims, fd)
        _HELD[key] = run
        yield run
    finally:
        _HELD.pop(key, None)
        _unlock(fd)
