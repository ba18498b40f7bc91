"""Import optional model libraries (torchvision, timm, a user's ``package.module``) without
crashing a process that shows napari.

Why: importing torchvision imports ``torch._dynamo``, which imports triton when it is installed
(it comes with PyTorch's CUDA builds). triton's ``libtriton.so`` carries its own LLVM and
exports its symbols unversioned. When napari's canvas runs on Mesa (llvmpipe under Xvfb, remote
desktops and VMs without a GPU driver; radeonsi on AMD cards), Mesa's driver has already loaded
the system's shared ``libLLVM`` into the global symbol scope, so libtriton's references bind to
that other LLVM version while libtriton's own code assumes its own data layouts: its static
initialisers corrupt the heap and the process dies with a segmentation fault, before Python can
raise anything. Importing triton *before* the OpenGL context exists is safe (libtriton then
binds to itself), but a napari plugin is imported after the viewer's window is up, so that order
can't be arranged.

What: :func:`install_import_guard` puts a finder first on ``sys.meta_path`` that, at the moment
something imports triton, looks at the shared libraries mapped into the process; if a shared
LLVM is among them, triton is made unimportable for the rest of the process (``ImportError``,
with a log line saying why) instead of crashing it. PyTorch treats triton as optional: without it
``torch.utils._triton.has_triton_package()`` is False and ``torch.compile`` / torch's triton
kernels are simply not used, which Grad-CAM never needs. Where no shared LLVM is loaded (the
command line, a batch worker, a GPU with its vendor's OpenGL driver) the finder does nothing and
triton imports as usual. The finder covers every import of triton in the process, whoever makes
it (torchvision, timm, ``torch.export``, a user's model factory, napari's console).

This module must not import napari or Qt: the core uses it too.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from types import ModuleType

log = logging.getLogger("napari_gradcam")

#: libraries that bundle their own LLVM and crash next to a shared one already loaded
CLASHING = ("triton",)

_lock = threading.Lock()
_blocked: dict[str, str] = {}  # module name -> why it was made unimportable


def foreign_llvm(maps: str = "/proc/self/maps") -> str | None:
    """The path of a shared LLVM library mapped into this process (Mesa's OpenGL drivers load
    one), or None; None also where the process's mappings can't be read (not Linux)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").rpartition(" ")[2]
                name = path.rpartition("/")[2]
                if name.startswith("libLLVM") and ".so" in name:
                    return path
    except OSError:
        return None
    return None


class _ClashGuard:
    """A ``sys.meta_path`` finder that refuses triton once a shared LLVM is loaded."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in CLASHING or sys.modules.get(top) is not None:
            return None  # not ours, or imported before any OpenGL context (safe)
        if top in _blocked:
            raise ModuleNotFoundError(_blocked[top], name=fullname)
        llvm = foreign_llvm()
        if llvm is None:
            return None  # nothing to clash with: let the normal finders import it
        block(top, llvm)
        raise ModuleNotFoundError(_blocked[top], name=fullname)

    def invalidate_caches(self):
        pass


_guard = _ClashGuard()


def block(name: str, llvm: str) -> None:
    """Make ``name`` unimportable in this process (``None`` in ``sys.modules`` is how Python
    spells "not available": ``import`` raises ModuleNotFoundError and
    ``importlib.util.find_spec`` returns None, which is what PyTorch checks)."""
    with _lock:
        if name in _blocked:
            return
        why = (f"{name} is not imported in this process: {llvm} (an OpenGL driver's LLVM) is "
               f"already loaded, and loading {name}'s own LLVM beside it would crash the "
               f"process; PyTorch runs without {name} here (no torch.compile GPU kernels). "
               f"To use {name}, import it before creating the napari viewer.")
        _blocked[name] = why
        sys.modules[name] = None  # type: ignore[assignment]
    log.warning("napari-gradcam: %s", why)
    if name == "triton":
        _drop_torch_triton_kernels()


def _drop_torch_triton_kernels() -> None:
    """PyTorch registers a few CUDA operators' triton kernels at import time when it *finds*
    triton (without importing it); once triton is refused, those would fail at their first
    call, so they are deregistered and the operators use their regular kernels."""
    native = sys.modules.get("torch._native.triton_utils")
    dereg = getattr(native, "deregister_op_overrides", None)
    if dereg is None:
        return
    try:
        dereg()
    except Exception as err:  # noqa: BLE001 - a private PyTorch API: never fail over it
        log.debug("could not deregister torch's triton kernels: %s", err)


def install_import_guard() -> None:
    """Put the guard first on ``sys.meta_path`` (once per process); cheap and idempotent."""
    with _lock:
        if _guard not in sys.meta_path:
            sys.meta_path.insert(0, _guard)


def blocked() -> dict[str, str]:
    """The libraries made unimportable in this process, with why."""
    return dict(_blocked)


def import_library(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for an optional model library (torchvision, timm, the
    module of a ``package.module:factory``), safe in a process that shows napari: see the
    module's docstring. Raises ImportError as ``import`` does when ``name`` is missing."""
    install_import_guard()
    return importlib.import_module(name)


__all__ = ["CLASHING", "blocked", "foreign_llvm", "import_library", "install_import_guard"]
