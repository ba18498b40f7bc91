"""Everything that faces napari: readers, writers (and later the widget and sample data).

The readers and writers work on napari's layer-data tuples and call the Qt-free core; they
import neither napari nor Qt themselves.
"""
