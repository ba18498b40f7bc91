"""One record per unit, in OUT/.napari-gradcam/records: what happened to it (the summary's rows)
and what it was made from. A unit's record is written last, after its files, so a unit with a
record counts as done; a rerun skips it only when the record matches the unit's source and the
run's settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import atomic_write
from .settings import _plain

if TYPE_CHECKING:
    from .discover import Unit

log = logging.getLogger(__name__)

STATE_DIR = ".napari-gradcam"  # records of finished units, inside the output folder


@dataclass
class Record:
    """What happened to one unit (the summary's rows)."""

    unit: str
    source: str
    status: str  # "ok" or "failed"
    message: str = ""
    images: list = field(default_factory=list)  # per image: index, class, score, regions
    shape: list = field(default_factory=list)  # the unit's shape (leading..., H, W / D, H, W)
    geojson: str = ""
    seconds: float = 0.0
    name: str = ""  # the unit's output name (heatmap, overlays)
    fingerprint: list = field(default_factory=list)  # the unit's source when it was done
    settings: str = ""  # digest of the run's settings (see run_settings)
    dims: int = 2  # the images' spatial axes: 3 for volumes explained by a 3D model

    @property
    def image_count(self) -> int:
        """Images in the unit (``images`` has a row per class found with target "found")."""
        return len({tuple(img["index"]) for img in self.images})


def record_path(out: Path, key: str) -> Path:
    return Path(out) / STATE_DIR / "records" / f"{key}.json"


def load_record(out: Path, key: str) -> Record | None:
    path = record_path(out, key)
    if not path.is_file():
        return None
    try:
        return Record(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # a foreign or damaged record: redo the unit


def is_done(record: Record | None, unit: Unit, settings: str) -> bool:
    """Whether ``record`` says ``unit`` finished from the same source (path, size, mtime)
    with the same settings: only then is it skipped."""
    return (record is not None and record.status == "ok" and record.settings == settings
            and record.fingerprint == _plain(unit.fingerprint))


def count_done(units: list[Unit], out, settings: str) -> int:
    """How many of ``units`` have a record that counts as done."""
    return sum(is_done(load_record(Path(out), u.key), u, settings) for u in units)


def _write_record(out: Path, unit: Unit, record: Record, settings: str) -> Record:
    record.name, record.settings = unit.name, settings
    record.fingerprint = _plain(unit.fingerprint)
    atomic_write(record_path(out, unit.key), json.dumps(asdict(record), allow_nan=False))
    return record


def _failed(unit: Unit, out: Path, message: str, settings: str = "") -> Record:
    message = " ".join(str(message).split())
    record = _write_record(out, unit, Record(unit.key, unit.path or unit.name, "failed",
                                             message), settings)
    log.warning("%s: %s", unit.path or unit.name, message)
    return record
