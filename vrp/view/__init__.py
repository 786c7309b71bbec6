"""The static per-sample viewer (`vrp view`): an index and one page per sample, read from the lake only.

See :mod:`vrp.view.build` for the layout of a view and why it loads its data the way it does.
"""

from vrp.view.build import ViewError, ViewSummary, page_key, page_path, write_view

__all__ = ["ViewError", "ViewSummary", "page_key", "page_path", "write_view"]
