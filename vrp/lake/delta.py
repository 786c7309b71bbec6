"""Thin, explicit helpers over ``deltalake``: table creation, appends with application transactions,
retried deletes/merges, and the Parquet writer settings of the lake.

Everything that touches the Delta log goes through here, so the rules of docs/ARCHITECTURE.md section 6
(create race-safely, never append a retried batch twice, provenance in every commit) live in
one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import pyarrow as pa
from deltalake import (
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from vrp.lake import storage
from vrp.lake.errors import LakeError, LakeLogError, LakeSchemaVersionError
from vrp.schema import SCHEMA_VERSION, SCHEMA_VERSION_PROPERTY, TableSpec

T = TypeVar("T")

#: Row-group cap for tables holding vectors: a few thousand rows keep selective vector reads fast
#: (docs/ARCHITECTURE.md section 6.2); narrow tables keep the library default.
VECTOR_ROW_GROUP_ROWS = 4096

LOG_DIR = "_delta_log"
_COMMIT = re.compile(r"^\d{20}\.json$")


def table_path(root: str | os.PathLike[str], name: str) -> str:
    """Folder (or object-store URI) of one table inside the lake root."""
    return storage.join(os.fspath(root), name)


#: Encoding of float columns and vector elements. PLAIN (with zstd) rather than BYTE_STREAM_SPLIT:
#: Spark's default vectorized Parquet reader before 4.3 rejects byte-stream-split pages, and
#: ``benchmarks/float_encoding.py`` measures what it would save on a toy lake (see its docstring).
FLOAT_ENCODING = "PLAIN"


def writer_properties(spec: TableSpec, *, float_encoding: str = FLOAT_ENCODING) -> WriterProperties:
    """zstd everywhere, no dictionaries; floats and vectors in `float_encoding`.

    deltalake 1.6 ignores per-column settings for nested columns, so in a table with vectors the
    float encoding is the *default* (it is what the vector elements get) and every non-float
    column is overridden with an encoding valid for its type. A table without vectors keeps PLAIN
    as its default, so its nested string lists (``samples.answers``) get an encoding valid for
    strings, and names its float columns one by one. Every encoding written by default is one the
    readers the README names take by default (pyarrow, DuckDB, Polars, Daft, Spark since 3.3).
    """
    floats = ColumnProperties(dictionary_enabled=False, encoding=float_encoding)
    plain = ColumnProperties(dictionary_enabled=False, encoding="PLAIN")
    overrides: dict[str, ColumnProperties] = {}
    for field in spec.schema:
        if field.name in spec.partition_by or field.name in spec.vectors:
            continue
        if pa.types.is_floating(field.type):
            if not spec.vectors:
                overrides[field.name] = floats
        elif pa.types.is_integer(field.type) or pa.types.is_timestamp(field.type):
            overrides[field.name] = ColumnProperties(dictionary_enabled=False, encoding="DELTA_BINARY_PACKED")
        else:
            overrides[field.name] = plain
    return WriterProperties(
        compression="ZSTD",
        compression_level=1,
        max_row_group_size=VECTOR_ROW_GROUP_ROWS if spec.vectors else None,
        default_column_properties=floats if spec.vectors else plain,
        column_properties=overrides,
    )


def load_table(root: str | os.PathLike[str], spec: TableSpec) -> DeltaTable | None:
    """The committed table, checked against this VRP's schema version, or None if absent."""
    path = table_path(root, spec.name)
    if not storage.is_remote(path) and not os.path.isdir(os.path.join(path, LOG_DIR)):
        return None
    try:
        dt = DeltaTable(path, storage_options=storage.storage_options(path))
    except TableNotFoundError:
        return None
    except OSError as exc:
        if not storage.is_remote(path):
            raise
        raise storage.storage_error(exc, f"cannot read lake table {path}") from exc
    except DeltaError as exc:
        log_file, problem = diagnose_log(path) or (
            storage.join(path, LOG_DIR),
            " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())[:200],
        )
        raise LakeLogError(spec.name, log_file, problem) from exc
    check_table(dt, spec, path, root=os.fspath(root))
    return dt


def diagnose_log(path: str) -> tuple[str, str] | None:
    """(log file, what is wrong with it) for a table whose Delta log does not load, or None.

    Checks what a reader needs: commit files from version 0 (or a checkpoint) without gaps, each
    made of JSON lines. The kernel's own error names neither the table nor the file.
    """
    from pyarrow import fs as pafs

    filesystem, base = storage.filesystem(path)
    log = posixpath.join(base, LOG_DIR)
    shown = storage.join(path, LOG_DIR)
    infos = filesystem.get_file_info(pafs.FileSelector(log, allow_not_found=True))
    commits = sorted(
        (int(i.base_name[:-5]), i)
        for i in infos
        if _COMMIT.match(i.base_name) and i.type == pafs.FileType.File
    )
    checkpointed = any(".checkpoint" in i.base_name for i in infos)
    if not commits:
        return shown, "no commit files (the log folder is empty or was deleted)"
    versions = [v for v, _ in commits]
    if not checkpointed:
        for expected, version in enumerate(versions):
            if version != expected:
                name = f"{expected:020d}.json"
                what = "the table's first commit" if expected == 0 else "a commit"
                return storage.join(shown, name), f"missing ({what} was deleted)"
    for _version, info in reversed(commits):
        with filesystem.open_input_stream(info.path) as stream:
            data = stream.read()
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                action = json.loads(line)
            except ValueError:
                action = None
            if not isinstance(action, dict):
                return (
                    storage.join(shown, info.base_name),
                    f"line {number} is not a JSON action (the file is truncated or overwritten)",
                )
    return None


def open_raw(root: str | os.PathLike[str], name: str) -> DeltaTable | None:
    """The committed table `name` without any version check (for ``vrp lake migrate``), or None."""
    path = table_path(root, name)
    if not storage.is_remote(path) and not os.path.isdir(os.path.join(path, "_delta_log")):
        return None
    try:
        with storage.translated_errors(path):
            return DeltaTable(path, storage_options=storage.storage_options(path))
    except TableNotFoundError:
        return None


def table_version(dt: DeltaTable) -> str | None:
    """The VRP schema version a table records in its properties (None for a foreign table)."""
    return dt.metadata().configuration.get(SCHEMA_VERSION_PROPERTY)


def check_table(dt: DeltaTable, spec: TableSpec, path: str, root: str | None = None) -> None:
    """Refuse a table of another schema version, or one whose columns differ from the spec."""
    found = table_version(dt)
    if found != str(SCHEMA_VERSION):
        raise LakeSchemaVersionError(spec.name, path, found, SCHEMA_VERSION, root=root)
    names = pa.schema(dt.schema().to_arrow()).names
    if names != spec.schema.names and names == [n for n in spec.schema.names if n in names]:
        # only columns a newer VRP of the same version added are missing: migrate appends them
        missing = [n for n in spec.schema.names if n not in names]
        where = f" --lake {root}" if root else ""
        raise LakeError(
            f"lake table '{spec.name}' at {path} lacks the columns {missing} that this VRP adds; "
            f"run `vrp lake migrate{where}` to add them (existing rows read them as null)"
        )
    if names != spec.schema.names:
        raise LakeError(
            f"lake table '{spec.name}' at {path} has columns {names}, but schema version {SCHEMA_VERSION} "
            f"defines {spec.schema.names}: the schema changed without a version bump; write to a new lake."
        )


def ensure_table(root: str | os.PathLike[str], spec: TableSpec) -> DeltaTable:
    """Open the table, creating it (race-safely: concurrent creators both succeed) when absent."""
    existing = load_table(root, spec)
    if existing is not None:
        return existing
    path = table_path(root, spec.name)
    if not storage.is_remote(path):
        os.makedirs(path, exist_ok=True)
    # another process may create it between our check and our commit: then its table is ours too
    with contextlib.suppress(DeltaError, CommitFailedError), storage.translated_errors(path):
        DeltaTable.create(
            path,
            spec.schema,
            mode="ignore",
            partition_by=list(spec.partition_by) or None,
            name=spec.name,
            description=f"VRP lake table {spec.name}",
            configuration={SCHEMA_VERSION_PROPERTY: str(SCHEMA_VERSION)},
            raise_if_key_not_exists=False,
            storage_options=storage.storage_options(path),
        )
    table = load_table(root, spec)
    if table is None:
        raise LakeError(f"could not create lake table {spec.name} at {path}")
    return table


def commit_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Commit-info entries (provenance); non-string values are stored as JSON."""
    return {
        f"vrp.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in values.items()
        if v is not None
    }


def append(
    dt: DeltaTable,
    spec: TableSpec,
    data: pa.Table,
    *,
    app_id: str | None = None,
    version: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bool:
    """Append `data` in one Delta commit; return False (writing nothing) if the application
    transaction `app_id` already reached `version` in this table.

    The check reads the latest log first, so a batch retried after a crash or a lost reply is
    stored once. Delta itself records but does not enforce application transaction versions. Two
    commits of one app id at the same time conflict in Delta (CommitFailedError): the loser checks
    again and retries, so it never reaches the caller.
    """
    if app_id is not None and version is None:
        raise ValueError("an application transaction needs a version")

    def attempt() -> bool:
        dt.update_incremental()
        txns = None
        if app_id is not None and version is not None:
            done = dt.transaction_version(app_id)
            if done is not None and done >= version:
                return False
            txns = [Transaction(app_id=app_id, version=version)]
        write_deltalake(
            dt,
            data,
            mode="append",
            writer_properties=writer_properties(spec),
            commit_properties=CommitProperties(
                custom_metadata=commit_metadata(metadata or {}), app_transactions=txns
            ),
        )
        return True

    return retry_commit(attempt)


def retry_commit(action: Callable[[], T], *, attempts: int = 8) -> T:
    """Run a read-modify-write Delta operation, retrying when a concurrent commit wins the race."""
    for attempt in range(attempts):
        try:
            return action()
        except CommitFailedError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (2**attempt))
    raise AssertionError("unreachable")


def sql_literal(value: Any) -> str:
    """A Delta (DataFusion) SQL literal; strings are quoted with embedded quotes doubled."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """A quoted SQL identifier (column names such as ``split`` or ``kind`` are safe)."""
    return '"' + name.replace('"', '""') + '"'


def equals_predicate(values: Mapping[str, Any]) -> str:
    """``"a" = 'x' AND "b" = 1`` for a mapping of column -> value."""
    return " AND ".join(f"{quote_ident(k)} = {sql_literal(v)}" for k, v in values.items())


def in_predicate(column: str, values: Iterable[Any]) -> str:
    """``"col" IN (...)`` for a non-empty collection of values."""
    items = ", ".join(sql_literal(v) for v in values)
    return f"{quote_ident(column)} IN ({items})"


def delete_where(dt: DeltaTable, predicate: str, metadata: Mapping[str, Any] | None = None) -> int:
    """Delete matching rows in one commit (retried on conflicts); return how many were deleted."""

    def action() -> int:
        dt.update_incremental()
        result = dt.delete(
            predicate, commit_properties=CommitProperties(custom_metadata=commit_metadata(metadata or {}))
        )
        return int(result.get("num_deleted_rows", 0) or 0)

    return retry_commit(action)
