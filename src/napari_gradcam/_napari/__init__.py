"""Everything that faces napari: the widget, the demo window, sample data, readers and writers.

The readers and writers work on napari's layer-data tuples and call the Qt-free core; they
import neither napari nor Qt themselves.
"""

from ..models import _optional

# Whatever of the plugin napari imports first (reader, writer, sample data, widget) runs in
# napari's process, after its canvas made an OpenGL context that may hold Mesa's LLVM: from here
# on triton (which torchvision, timm and torch.export import) is refused rather than allowed to
# crash napari. Costs nothing: every module here already imports the core, and so PyTorch.
_optional.install_import_guard()
