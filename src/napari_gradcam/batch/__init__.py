"""``napari-gradcam batch``: files, folders, TIFF stacks, zarr arrays and NIfTI / DICOM volumes
-> heatmaps, regions, QuPath GeoJSON, one COCO file and a summary table, resumably.

The work is cut into units (:mod:`.discover`): an image file, a volume (NIfTI file or DICOM
series folder, with its affine: its heatmap and label map go back out as NIfTI), or a range of
leading indices of a zarr array or a long TIFF stack (only leading axes: a 3D model's volume is
one image). :mod:`.read` decodes a unit and checks it fits; :mod:`.schedule`
overlaps reading, the model (one :class:`~napari_gradcam.job.ExplainJob`, built from the
options by :mod:`.explainer`) and writing (:mod:`.write`), which writes each unit's files
atomically and its record (:mod:`.records`) last, so a unit with a record is done and a rerun
skips it. A record counts only for the same source (resolved path, size, mtime) and
the same settings (:mod:`.settings`: model file hashes, method, target, regions, masks), and a
run holds the output folder alone (:mod:`.output`). ``coco.json`` and ``summary.csv`` are
rebuilt from the records and GeoJSON files at the end of every run. :mod:`.cluster` maps groups
of units over a dask.distributed cluster with the same single-process run.
"""

from ..job import FOUND
from .discover import (
    Unit, collect_units, format_mask, mask_pattern_problem, name_units, source_fingerprint,
    units_for_array,
)
from .explainer import check_segmentation_options, make_job, nan_cause
from .output import OutputInUse, Run, SettingsChanged, check_output, claim_output, held_run
from .read import (
    IMAGE_SUFFIXES, VOLUME_SUFFIXES, is_volume_input, open_lazy, read_unit, tiff_series_note,
    volume_header,
)
from .records import STATE_DIR, Record, count_done, is_done, load_record
from .schedule import iter_progress, process_units
from .settings import Options, model_fingerprint, run_settings, settings_changes
from .write import finish_unit, prepare_outputs, write_summary

__all__ = [
    "FOUND", "IMAGE_SUFFIXES", "STATE_DIR", "VOLUME_SUFFIXES", "Options", "OutputInUse",
    "Record", "Run", "SettingsChanged", "Unit", "check_output", "check_segmentation_options",
    "claim_output", "collect_units",
    "count_done", "finish_unit", "format_mask", "held_run", "is_done", "is_volume_input",
    "iter_progress", "load_record", "make_job", "mask_pattern_problem", "model_fingerprint",
    "name_units", "nan_cause", "open_lazy", "prepare_outputs", "process_units", "read_unit",
    "run_settings", "settings_changes", "source_fingerprint", "tiff_series_note",
    "units_for_array", "volume_header", "write_summary",
]
