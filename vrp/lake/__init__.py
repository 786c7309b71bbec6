"""The activation lake: Delta tables written crash-safely per run, read through DuckDB and Polars.

``open_lake(root)`` gives a :class:`Lake` (``.sql``, ``.table``, ``.arrow``, ``.writer``,
``.write_table``); :class:`RunWriter` implements the completion and resume rules of
docs/ARCHITECTURE.md section 6.3. Schemas live in :mod:`vrp.schema`.
"""

from vrp.lake.errors import LakeError, LakeSchemaVersionError, LakeValidationError
from vrp.lake.lake import Lake, open_lake, resolve_lake_root, to_matrix
from vrp.lake.writer import RunWriter

__all__ = [
    "Lake",
    "LakeError",
    "LakeSchemaVersionError",
    "LakeValidationError",
    "RunWriter",
    "open_lake",
    "resolve_lake_root",
    "to_matrix",
]
