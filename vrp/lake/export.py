"""Export a consistent snapshot of a lake to a directory or an object-store prefix, with a card.

Each table is copied from one pinned version (the versions the :class:`Lake` pinned when it was
opened) into a fresh Delta table of the same schema and partitioning, in one commit that
records the source and its version. Tables are pinned with ``samples`` before the other
per-sample tables, and writers commit ``samples`` last, so every exported sample has all its rows.
Files are rewritten, not copied: the export is also compacted, and orphans of killed writers in
the source are never carried over. A ``README.md`` card at the destination tells collaborators
what is inside (runs, models, datasets, tables, schema) and how to read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, write_deltalake

import vrp
from vrp.lake import delta, storage
from vrp.lake.errors import LakeError
from vrp.lake.lake import Lake
from vrp.schema import SCHEMA_VERSION, TABLES

CARD_NAME = "README.md"


@dataclass(frozen=True)
class ExportedTable:
    """One exported table: the source version it was read at and the rows copied."""

    name: str
    source_version: int
    rows: int


def export_lake(lake: Lake, dest: str) -> list[ExportedTable]:
    """Copy every table of `lake` (at its pinned versions) to the empty lake root `dest`."""
    dest = storage.normalize_root(dest)
    check_destination(lake.root, dest)
    exported = []
    for name, spec in TABLES.items():
        dt = lake.delta(name)
        if dt is None:
            continue
        version = dt.version()
        scanner = dt.to_pyarrow_dataset().scanner(columns=spec.schema.names)
        reader = pa.RecordBatchReader.from_batches(
            spec.schema, (batch.cast(spec.schema) for batch in scanner.to_batches())
        )
        out = delta.ensure_table(dest, spec)
        meta = {"operation": "export", "source": lake.root, "source_version": version}
        with storage.translated_errors(out.table_uri):
            write_deltalake(
                out,
                reader,
                mode="append",
                writer_properties=delta.writer_properties(spec),
                commit_properties=CommitProperties(custom_metadata=delta.commit_metadata(meta)),
            )
        exported.append(ExportedTable(name, version, lake.dataset(name).count_rows()))
    write_text(dest, CARD_NAME, card(lake, exported))
    return exported


def _inside(root: str, path: str) -> bool:
    """Whether `path` is `root` or lies under it (both local paths or both URIs)."""
    if storage.is_remote(root) != storage.is_remote(path):
        return False
    if storage.is_remote(root):
        return path == root or path.startswith(root.rstrip("/") + "/")
    root_abs, path_abs = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root_abs, path_abs]) == root_abs


def check_destination(source: str, dest: str) -> None:
    """Refuse an export destination that is not a new or empty folder (or prefix) outside the lake.

    Export writes a ``README.md`` card and table folders: into a non-empty folder it would
    overwrite the user's files, and inside the source lake its files would be orphans that a
    later ``vrp lake vacuum`` deletes.
    """
    if _inside(source, dest):
        raise LakeError(
            f"export destination {dest} is inside the lake {source} (vacuum would delete it there); "
            "choose a folder or prefix outside the lake"
        )
    if not storage.is_remote(dest):
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise LakeError(f"export destination {dest} is an existing file; choose a new or empty folder")
        if os.path.isdir(dest) and os.listdir(dest):
            raise LakeError(
                f"export destination {dest} is not empty: export needs an empty destination "
                "(a new or empty folder); nothing was written"
            )
        return
    from pyarrow import fs as pafs

    filesystem, base = storage.arrow_filesystem(dest)
    with storage.translated_errors(dest):
        if filesystem.get_file_info(base).type == pafs.FileType.File:
            raise LakeError(f"export destination {dest} is an existing object; choose a new or empty prefix")
        listing = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    if listing:
        raise LakeError(
            f"export destination {dest} is not empty: export needs an empty destination "
            "(a new or empty prefix); nothing was written"
        )


def write_text(root: str, name: str, text: str) -> None:
    """Write a small text file at the lake root, locally or on object storage."""
    path = storage.join(root, name)
    if not storage.is_remote(root):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return
    filesystem, base = storage.arrow_filesystem(root)
    with storage.translated_errors(path), filesystem.open_output_stream(f"{base}/{name}") as stream:
        stream.write(text.encode("utf-8"))


def _rows(lake: Lake, sql: str) -> list[dict[str, Any]]:
    return lake.sql(sql).to_arrow_table().to_pylist()


def _table_md(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    if not rows:
        return ["(none)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")
    return lines


def card(lake: Lake, exported: list[ExportedTable]) -> str:
    """The README card of an exported lake (Markdown)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# VRP activation lake (exported snapshot)",
        "",
        f"Exported {now} by VRP {vrp.__version__} (lake schema version {SCHEMA_VERSION}) from "
        f"`{lake.root}`. Every folder is a Delta Lake table; its one commit holds the rows of the "
        "source table version listed below. Join tables on `run_id` and `sample_id`; a sample is "
        "complete when it has a `samples` row.",
        "",
        "## Runs",
        "",
    ]
    has_runs = lake.has_table("runs")
    runs = (
        _rows(
            lake,
            "SELECT run_id, model, family, dataset, split, status, n_done, n_failed, base_run_id "
            "FROM runs ORDER BY started_at, run_id",
        )
        if has_runs
        else []
    )
    out += _table_md(
        runs, ["run_id", "model", "family", "dataset", "split", "status", "n_done", "n_failed", "base_run_id"]
    )
    out += ["", "## Models", ""]
    models = (
        _rows(
            lake,
            "SELECT model, family, model_source, model_revision, count(*) AS runs "
            "FROM runs GROUP BY ALL ORDER BY model",
        )
        if has_runs
        else []
    )
    out += _table_md(models, ["model", "family", "model_source", "model_revision", "runs"])
    out += ["", "## Datasets", ""]
    datasets = (
        _rows(
            lake,
            "SELECT dataset, split, count(DISTINCT sample_id) AS questions, count(DISTINCT run_id) AS runs "
            "FROM samples GROUP BY ALL ORDER BY dataset, split",
        )
        if lake.has_table("samples")
        else []
    )
    out += _table_md(datasets, ["dataset", "split", "questions", "runs"])
    out += ["", "## Tables", ""]
    out += _table_md(
        [
            {
                "table": t.name,
                "source version": t.source_version,
                "rows": t.rows,
                "partitioned by": ", ".join(TABLES[t.name].partition_by) or "-",
                "key": ", ".join(TABLES[t.name].key),
            }
            for t in exported
        ],
        ["table", "source version", "rows", "partitioned by", "key"],
    )
    out += ["", "## Schema", ""]
    for t in exported:
        out += [f"### {t.name}", ""]
        out += _table_md(
            [{"column": f.name, "type": str(f.type)} for f in TABLES[t.name].schema], ["column", "type"]
        )
        out.append("")
    out += [
        "## Reading it",
        "",
        'With VRP: `vrp query --lake <this location> "SELECT ..."`. Without VRP, through `deltalake`',
        "(which also reads `s3://` with `storage_options` or the AWS environment variables):",
        "",
        "```python",
        "import duckdb, polars as pl",
        "from deltalake import DeltaTable",
        "samples = DeltaTable('<this location>/samples').to_pyarrow_dataset()",
        "duckdb.sql('SELECT model, avg(correct::INT) FROM samples GROUP BY model')",
        "pl.scan_delta('<this location>/layers').filter(pl.col('layer') == 0).collect()",
        "```",
        "",
        "Spark (with delta-spark): `spark.read.format('delta').load('<this location>/samples')`.",
        "",
        "Commit metadata of each table (`DeltaTable(...).history()`) records the source and version:",
        "```json",
        json.dumps({"vrp.operation": "export", "vrp.source": lake.root}, indent=None),
        "```",
        "",
    ]
    return "\n".join(out)
