"""The lake reader (DuckDB views, Polars frames, Arrow tables) and the entry point for writers.

Usage::

    lake = open_lake("vrp-lake")
    lake.sql("SELECT model, avg(correct::INT) FROM samples GROUP BY model").to_arrow_table()
    lake.table("layers").filter(pl.col("layer") == 3).collect()

Every read goes through ``deltalake``: each table is the Arrow dataset of the snapshot that
was committed when the lake was opened (or last refreshed). Nothing globs a folder, so files
left behind by a killed writer are never read, and the same code reads object storage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import CommitProperties, DeltaTable, write_deltalake

from vrp.lake import delta, storage
from vrp.lake.errors import LakeLogError, LakeValidationError
from vrp.lake.validate import Rows, to_arrow, validate
from vrp.lake.writer import RunWriter
from vrp.schema import TABLES, TableSpec

DEFAULT_LAKE = "./vrp-lake"


def resolve_lake_root(lake: str | None) -> str:
    """The lake root (a directory or s3:// URI): `lake` (--lake) if given, else $VRP_LAKE, else ./vrp-lake."""
    return lake or os.environ.get("VRP_LAKE") or DEFAULT_LAKE


def open_lake(root: str | os.PathLike[str]) -> Lake:
    """Open the lake at `root` for reading and writing; an absent folder is an empty lake."""
    return Lake(root)


def _spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"no lake table {name!r}; tables are {', '.join(TABLES)}") from None


def _filter_expression(filter: Any) -> pc.Expression | None:
    """A pyarrow expression from an expression, or a mapping column -> value (lists mean IN)."""
    if filter is None or isinstance(filter, pc.Expression):
        return filter
    if isinstance(filter, Mapping):
        expr = None
        for column, value in filter.items():
            if isinstance(value, list | tuple | set | frozenset):
                term = pc.field(column).isin(list(value))
            else:
                term = pc.field(column) == value
            expr = term if expr is None else expr & term
        return expr
    raise TypeError("filter must be a pyarrow.compute.Expression or a mapping of column -> value(s)")


def to_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A vector column (float32 lists of one width) as a 2-D float32 numpy array, without copying per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.unique(pc.list_value_length(column))
    if len(lengths) != 1:
        raise ValueError(f"vectors of several widths {sorted(lengths.to_pylist())}: filter one model first")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(column), int(lengths[0].as_py()))


class Lake:
    """A lake directory of Delta tables, read at a pinned snapshot; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = storage.normalize_root(root)
        if not storage.is_remote(self.root) and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(f"lake root {self.root} is a file, not a directory")
        self._tables: dict[str, DeltaTable] = {}
        self.broken: dict[str, LakeLogError] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read every table's log, so later reads see commits made since opening.

        A table whose log is damaged is kept in ``broken`` instead of failing the whole lake:
        reading it raises its error (naming the log file), the other tables read as usual.
        """
        tables = {}
        broken = {}
        for name, spec in TABLES.items():
            try:
                dt = delta.load_table(self.root, spec)
            except LakeLogError as exc:
                broken[name] = exc
                continue
            if dt is not None:
                tables[name] = dt
        self._tables = tables
        self.broken = broken
        if self._con is not None:
            self._con.close()
            self._con = None

    def _readable(self, name: str) -> None:
        _spec(name)
        if name in self.broken:
            raise self.broken[name]

    def has_table(self, name: str) -> bool:
        """Whether the table exists (has a committed log) in the opened snapshot."""
        self._readable(name)
        return name in self._tables

    def delta(self, name: str) -> DeltaTable | None:
        """The pinned ``DeltaTable`` of one table (None when it does not exist yet)."""
        self._readable(name)
        return self._tables.get(name)

    def versions(self) -> dict[str, int]:
        """Delta version of every existing table (unchanged versions mean nothing new)."""
        return {name: dt.version() for name, dt in self._tables.items()}

    def dataset(self, name: str) -> pads.Dataset:
        """The Arrow dataset of the committed snapshot (an empty one for an absent table)."""
        spec = _spec(name)
        self._readable(name)
        dt = self._tables.get(name)
        if dt is None:
            return pads.dataset(spec.schema.empty_table())
        return dt.to_pyarrow_dataset()

    def arrow(self, name: str, filter: Any = None, columns: list[str] | None = None) -> pa.Table:
        """Rows of one table as Arrow; `filter` is a pyarrow expression or {column: value(s)}."""
        return self.dataset(name).to_table(filter=_filter_expression(filter), columns=columns)

    def table(self, name: str) -> pl.LazyFrame:
        """A Polars lazy frame over the committed snapshot's Arrow dataset.

        Through the Arrow dataset rather than ``pl.scan_delta``: on a damaged file the latter
        panics (polars 2.1) where the dataset raises an error naming the file.
        """
        return pl.scan_pyarrow_dataset(self.dataset(name))

    def connect(self, *, safe: bool = False, temp_directory: str | None = None) -> duckdb.DuckDBPyConnection:
        """A new DuckDB connection with one view per table (empty for absent tables).

        `safe` locks it down for untrusted SQL: no extension auto-install/-load, no file or
        network access (the views read through Arrow, so they still work), configuration locked.
        DuckDB still reads and writes its temp directory then, so a safe connection needs
        `temp_directory`: an empty folder of its own (``vrp query`` makes a fresh one per query).
        """
        if safe and temp_directory is None:
            raise ValueError("a safe connection needs its own empty temp_directory")
        config: dict[str, str | bool] = {
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
        if temp_directory is not None:
            config["temp_directory"] = temp_directory
        con = duckdb.connect(config=config)
        con.execute("SET enable_progress_bar = false")  # drawn on stdout, into the CSV a pipeline reads
        for name in TABLES:
            if name not in self.broken:  # a query naming a broken table gets its error (run_query)
                con.register(name, self.dataset(name))
        if safe:
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        return con

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run SQL over the lake's views (a trusted caller's SQL; `vrp query` uses a locked connection)."""
        if self._con is None:
            self._con = self.connect()
        return self._con.sql(query)

    def writer(
        self,
        run: dict[str, Any],
        *,
        shard: tuple[int, int] = (0, 1),
        owned_sample_ids: Iterable[str] | None = None,
    ) -> RunWriter:
        """A writer for one run (one shard of it); call ``begin()`` before committing."""
        return RunWriter(self.root, run, shard=shard, owned_sample_ids=owned_sample_ids)

    def write_table(self, name: str, rows: Rows, *, replace_where: dict[str, Any] | None = None) -> None:
        """Write analysis outputs (e.g. ``probe_layers``) in one validated, atomic commit.

        With `replace_where` (e.g. ``{"run_id": r}``) the rows matching it are replaced, so
        re-running an analysis overwrites its previous results instead of adding to them.
        """
        spec = _spec(name)
        data = to_arrow(spec, rows)
        widths = validate(spec, data)
        predicate = None
        if replace_where:
            for column, value in replace_where.items():
                if column not in spec.schema.names:
                    raise LakeValidationError(name, column, None, "replace_where names an unknown column")
                off = pc.fill_null(
                    pc.not_equal(data.column(column), pa.scalar(value, data.schema.field(column).type)), True
                )
                if data.num_rows and pc.any(off).as_py():
                    raise LakeValidationError(
                        name, column, None, f"a row does not match replace_where {column}={value!r}"
                    )
            predicate = delta.equals_predicate(replace_where)
        dt = delta.ensure_table(self.root, spec)
        meta = {"operation": "write_table", "table": name, "vector_widths": widths or None}
        if predicate is None:
            delta.append(dt, spec, data, metadata=meta)
        else:

            def overwrite() -> None:
                dt.update_incremental()
                write_deltalake(
                    dt,
                    data,
                    mode="overwrite",
                    predicate=predicate,
                    writer_properties=delta.writer_properties(spec),
                    commit_properties=CommitProperties(custom_metadata=delta.commit_metadata(meta)),
                )

            delta.retry_commit(overwrite)
        self.refresh()
