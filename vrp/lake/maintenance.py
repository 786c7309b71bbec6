"""Lake upkeep: sizes and counts, integrity checks, orphan removal, compaction, dropping a run.

A killed writer leaves Parquet files that no commit references ("orphans"): harmless to VRP's
readers, which list files from the Delta log, but wasted space and a trap for anyone who globs
the folder. ``check`` finds them and verifies every committed file (exists, size as logged,
footer readable); ``vacuum`` deletes orphans old enough not to belong to a writer still running.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable

from vrp.lake import delta
from vrp.lake.lake import Lake
from vrp.schema import TABLES, TableSpec

LOG_DIR = "_delta_log"


@dataclass(frozen=True)
class TableInfo:
    """Size of one table at its committed version."""

    name: str
    version: int
    files: int
    rows: int
    bytes: int


@dataclass(frozen=True)
class FileProblem:
    """A committed file that is missing, has the wrong size, or whose Parquet footer does not read."""

    table: str
    path: str
    problem: str


@dataclass(frozen=True)
class Orphan:
    """A file in a table folder that no Delta commit references (left by a killed writer)."""

    table: str
    path: str
    bytes: int
    age_s: float


def _add_actions(dt: DeltaTable) -> list[dict]:
    actions = pa.table(dt.get_add_actions(flatten=True))
    return actions.select(["path", "size_bytes", "num_records"]).to_pylist()


def _disk_path(table_dir: str, log_path: str) -> str:
    """Local file of a log path (the log stores partition folders URL-encoded once more)."""
    return os.path.normpath(os.path.join(table_dir, unquote(log_path)))


def table_info(lake: Lake) -> list[TableInfo]:
    """Version, file count, row count and bytes of every existing table (from the log, no scans)."""
    out = []
    for name in TABLES:
        dt = lake.delta(name)
        if dt is None:
            continue
        actions = _add_actions(dt)
        out.append(
            TableInfo(
                name,
                dt.version(),
                len(actions),
                sum(int(a["num_records"] or 0) for a in actions),
                sum(int(a["size_bytes"]) for a in actions),
            )
        )
    return out


def _logged_paths(table_dir: str) -> set[str]:
    """Every data file any commit or checkpoint of the table mentions (added or removed)."""
    log_dir = os.path.join(table_dir, LOG_DIR)
    paths: set[str] = set()
    for entry in os.listdir(log_dir):
        full = os.path.join(log_dir, entry)
        if entry.endswith(".json") and entry[:-5].isdigit():
            with open(full, encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    action = json.loads(line)
                    for kind in ("add", "remove"):
                        if kind in action:
                            paths.add(_disk_path(table_dir, action[kind]["path"]))
        elif ".checkpoint" in entry and entry.endswith(".parquet"):
            checkpoint = pq.read_table(full)
            for kind in ("add", "remove"):
                if kind in checkpoint.column_names:
                    column = pc.struct_field(checkpoint.column(kind), "path")
                    paths.update(_disk_path(table_dir, p) for p in column.to_pylist() if p)
    return paths


def _is_log_file(name: str) -> bool:
    stem = name.split(".", 1)[0]
    return (stem.isdigit() and not name.endswith(".tmp")) or name in ("_last_checkpoint", "_last_vacuum_info")


def find_orphans(lake: Lake) -> list[Orphan]:
    """Files under each table folder that no commit references, and stray temporary log files."""
    now = time.time()
    orphans = []
    for name in TABLES:
        table_dir = delta.table_path(lake.root, name)
        if not os.path.isdir(os.path.join(table_dir, LOG_DIR)):
            continue
        logged = _logged_paths(table_dir)
        for folder, dirs, files in os.walk(table_dir):
            in_log = os.path.relpath(folder, table_dir) == LOG_DIR
            if in_log:
                dirs[:] = []  # the log's own subfolders belong to Delta
            for file in files:
                path = os.path.normpath(os.path.join(folder, file))
                if (in_log and _is_log_file(file)) or (not in_log and path in logged):
                    continue
                stat = os.stat(path)
                orphans.append(Orphan(name, path, stat.st_size, now - stat.st_mtime))
    return orphans


def check(lake: Lake, *, read_footers: bool = True) -> tuple[list[FileProblem], list[Orphan]]:
    """Verify every committed file of every table, and list orphans."""
    problems = []
    for name in TABLES:
        dt = lake.delta(name)
        if dt is None:
            continue
        table_dir = delta.table_path(lake.root, name)
        for action in _add_actions(dt):
            path = _disk_path(table_dir, action["path"])
            if not os.path.exists(path):
                problems.append(FileProblem(name, path, "missing (committed in the log but not on disk)"))
                continue
            size = os.path.getsize(path)
            if size != int(action["size_bytes"]):
                logged = action["size_bytes"]
                problems.append(FileProblem(name, path, f"size {size} bytes, the log says {logged}"))
                continue
            if read_footers:
                try:
                    rows = pq.ParquetFile(path).metadata.num_rows
                except (pa.ArrowException, OSError) as exc:
                    problems.append(FileProblem(name, path, f"unreadable Parquet footer: {exc}"))
                    continue
                if action["num_records"] is not None and rows != int(action["num_records"]):
                    logged = action["num_records"]
                    problems.append(FileProblem(name, path, f"{rows} rows, the log says {logged}"))
    return problems, find_orphans(lake)


def vacuum(lake: Lake, *, dry_run: bool = True, min_age_s: float = 3600.0) -> list[Orphan]:
    """Delete (or, dry run, just list) orphans older than `min_age_s`.

    The age guard protects a writer that is still running: its files are orphans until its
    commit lands.
    """
    selected = [o for o in find_orphans(lake) if o.age_s >= min_age_s]
    if not dry_run:
        for orphan in selected:
            os.remove(orphan.path)
    return selected


def vacuum_history(lake: Lake, *, retain_hours: int, dry_run: bool = True) -> dict[str, list[str]]:
    """Delta's own vacuum: files removed from the log (by compact, delete, drop-run) more than
    `retain_hours` ago; time travel to versions older than that stops working."""
    out = {}
    for name in TABLES:
        dt = lake.delta(name)
        if dt is not None:
            out[name] = dt.vacuum(
                retention_hours=retain_hours, dry_run=dry_run, enforce_retention_duration=False
            )
    return out


def compact(lake: Lake) -> dict[str, dict]:
    """Delta's optimize (bin-packing small files) on every table; returns its metrics per table."""
    out = {}
    for name, spec in TABLES.items():
        dt = lake.delta(name)
        if dt is None:
            continue

        meta = CommitProperties(custom_metadata=delta.commit_metadata({"operation": "compact"}))

        def action(dt: DeltaTable = dt, spec: TableSpec = spec, meta: CommitProperties = meta) -> dict:
            dt.update_incremental()
            props = delta.writer_properties(spec)
            return dt.optimize.compact(writer_properties=props, commit_properties=meta)

        out[name] = delta.retry_commit(action)
    lake.refresh()
    return out


def run_rows(lake: Lake, run_id: str) -> dict[str, int]:
    """How many rows each table holds for `run_id`."""
    out = {}
    for name in TABLES:
        if lake.has_table(name):
            n = lake.dataset(name).count_rows(filter=pc.field("run_id") == run_id)
            if n:
                out[name] = n
    return out


def drop_run(lake: Lake, run_id: str) -> dict[str, int]:
    """Delete every row of `run_id` from every table (one commit per table); returns rows deleted."""
    deleted = {}
    predicate = delta.equals_predicate({"run_id": run_id})
    for name in run_rows(lake, run_id):
        dt = lake.delta(name)
        assert dt is not None
        deleted[name] = delta.delete_where(dt, predicate, {"operation": "drop_run", "run_id": run_id})
    lake.refresh()
    return deleted
