"""Lake upkeep: sizes and counts, integrity checks, orphan removal, compaction, dropping a run.

A killed writer leaves Parquet files that no commit references ("orphans"): harmless to VRP's
readers, which list files from the Delta log, but wasted space and a trap for anyone who globs
the folder. ``check`` finds them and verifies every committed file (exists, size as logged,
footer readable); ``vacuum`` deletes orphans old enough not to belong to a writer still running.
Both read the lake's files through one pyarrow filesystem, so they work alike on a local lake and
on a lake in an S3 bucket (paths are shown as ``s3://...`` there).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from pyarrow import fs as pafs

from vrp.lake import delta, storage
from vrp.lake.delta import LOG_DIR
from vrp.lake.lake import Lake
from vrp.schema import TABLES, TableSpec


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
class DuplicateKey:
    """A row key stored more than once in one table (two writers committed the same sample)."""

    table: str
    key: dict[str, Any]
    count: int


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


@dataclass(frozen=True)
class _Files:
    """The lake's files through one pyarrow filesystem (local disk or an S3 bucket).

    ``base`` is the lake root inside that filesystem; ``prefix`` turns a filesystem path into the
    path users see (``s3://`` for a bucket, nothing locally).
    """

    fs: Any
    base: str
    prefix: str

    def table_dir(self, name: str) -> str:
        return posixpath.join(self.base, name)

    def shown(self, path: str) -> str:
        return self.prefix + path

    def inner(self, shown: str) -> str:
        return shown.removeprefix(self.prefix)


def _files(lake: Lake) -> _Files:
    if storage.is_remote(lake.root):
        fs, base = storage.arrow_filesystem(lake.root)
        return _Files(fs, base, "s3://")
    return _Files(pafs.LocalFileSystem(), os.path.abspath(lake.root), "")


def _data_path(table_dir: str, log_path: str) -> str:
    """Filesystem path of a log path (the log stores partition folders URL-encoded once more)."""
    return posixpath.normpath(posixpath.join(table_dir, unquote(log_path)))


def _readable_tables(lake: Lake) -> list[tuple[str, DeltaTable]]:
    """(name, table) of every existing table whose log reads (``lake.broken`` holds the others)."""
    return [(name, dt) for name in TABLES if name not in lake.broken and (dt := lake.delta(name)) is not None]


def table_info(lake: Lake) -> list[TableInfo]:
    """Version, file count, row count and bytes of every readable table (from the log, no scans)."""
    out = []
    for name, dt in _readable_tables(lake):
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


def _logged_paths(files: _Files, table_dir: str) -> set[str]:
    """Every data file any commit or checkpoint of the table mentions (added or removed)."""
    paths: set[str] = set()
    for info in files.fs.get_file_info(pafs.FileSelector(posixpath.join(table_dir, LOG_DIR))):
        entry = info.base_name
        if info.type != pafs.FileType.File:
            continue
        if entry.endswith(".json") and entry[:-5].isdigit():
            with files.fs.open_input_stream(info.path) as stream:
                text = stream.read().decode("utf-8")
            for line in text.splitlines():
                if not line.strip():
                    continue
                action = json.loads(line)
                for kind in ("add", "remove"):
                    if kind in action:
                        paths.add(_data_path(table_dir, action[kind]["path"]))
        elif ".checkpoint" in entry and entry.endswith(".parquet"):
            checkpoint = pq.read_table(info.path, filesystem=files.fs)
            for kind in ("add", "remove"):
                if kind in checkpoint.column_names:
                    column = pc.struct_field(checkpoint.column(kind), "path")
                    paths.update(_data_path(table_dir, p) for p in column.to_pylist() if p)
    return paths


def _is_log_file(name: str) -> bool:
    stem = name.split(".", 1)[0]
    return (stem.isdigit() and not name.endswith(".tmp")) or name in ("_last_checkpoint", "_last_vacuum_info")


def find_orphans(lake: Lake) -> list[Orphan]:
    """Files under each table folder that no commit references, and stray temporary log files."""
    files = _files(lake)
    now = time.time()
    orphans = []
    for name, _dt in _readable_tables(lake):
        table_dir = files.table_dir(name)
        logged = _logged_paths(files, table_dir)
        listing = files.fs.get_file_info(pafs.FileSelector(table_dir, recursive=True))
        for info in listing:
            if info.type != pafs.FileType.File:
                continue
            parts = posixpath.relpath(info.path, table_dir).split("/")
            if parts[0] == LOG_DIR:
                if len(parts) > 2 or _is_log_file(parts[1]):
                    continue  # the log's own files, and its subfolders, belong to Delta
            elif posixpath.normpath(info.path) in logged:
                continue
            age = now - info.mtime.timestamp() if info.mtime is not None else 0.0  # unknown: assume fresh
            orphans.append(Orphan(name, files.shown(info.path), info.size, age))
    return orphans


def damaged_files(lake: Lake, *, read_footers: bool = True) -> list[FileProblem]:
    """Committed files that are missing, of the wrong size or unreadable; and broken logs."""
    files = _files(lake)
    problems = [FileProblem(name, error.log_file, error.problem) for name, error in lake.broken.items()]
    for name, dt in _readable_tables(lake):
        table_dir = files.table_dir(name)
        actions = _add_actions(dt)
        paths = [_data_path(table_dir, action["path"]) for action in actions]
        infos = files.fs.get_file_info(paths) if paths else []
        for action, path, info in zip(actions, paths, infos, strict=True):
            shown = files.shown(path)
            if info.type == pafs.FileType.NotFound:
                problems.append(FileProblem(name, shown, "missing (committed in the log but not on disk)"))
                continue
            if info.size != int(action["size_bytes"]):
                logged = action["size_bytes"]
                problems.append(FileProblem(name, shown, f"size {info.size} bytes, the log says {logged}"))
                continue
            if read_footers:
                try:
                    with files.fs.open_input_file(path) as handle:
                        rows = pq.ParquetFile(handle).metadata.num_rows
                except (pa.ArrowException, OSError) as exc:
                    problems.append(FileProblem(name, shown, f"unreadable Parquet footer: {exc}"))
                    continue
                if action["num_records"] is not None and rows != int(action["num_records"]):
                    logged = action["num_records"]
                    problems.append(FileProblem(name, shown, f"{rows} rows, the log says {logged}"))
    return problems


def check(lake: Lake, *, read_footers: bool = True) -> tuple[list[FileProblem], list[Orphan]]:
    """Verify every committed file of every table, and list orphans."""
    return damaged_files(lake, read_footers=read_footers), find_orphans(lake)


@dataclass(frozen=True)
class RepairedFile:
    """A damaged data file taken out of its table's log, and the samples it may have held."""

    table: str
    path: str
    moved_to: str | None  # where the damaged bytes were kept (None: the file was missing)
    runs: tuple[str, ...]  # runs whose rows it may have held
    sample_range: tuple[str, str] | None  # smallest and largest sample id in it (None: unknown)


@dataclass(frozen=True)
class RepairResult:
    """What `repair` removed, and how many complete samples of each run it reopened (or would)."""

    files: list[RepairedFile]
    reopened: dict[str, int]


QUARANTINE_DIR = "_quarantine"


def _stat(action: dict[str, Any], kind: str, column: str) -> Any:
    value = action.get(f"{kind}.{column}")
    return None if value is None else str(value)


def _affected(
    lake: Lake, table: str, action: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    """Runs (ids) and the sample-id range a data file held, from the log's per-file statistics."""
    low_run, high_run = _stat(action, "min", "run_id"), _stat(action, "max", "run_id")
    model = action.get("partition.model")
    runs = lake.arrow("runs", columns=["run_id", "model"]).to_pylist() if lake.has_table("runs") else []
    chosen = [
        r["run_id"]
        for r in runs
        if (model is None or r["model"] == model)
        and (low_run is None or low_run <= r["run_id"])
        and (high_run is None or r["run_id"] <= high_run)
    ]
    if not chosen and low_run is not None and low_run == high_run:
        chosen = [low_run]  # its runs row is gone too: the run id is still known
    low_sample, high_sample = _stat(action, "min", "sample_id"), _stat(action, "max", "sample_id")
    sample_range = (low_sample, high_sample) if low_sample is not None and high_sample is not None else None
    return tuple(sorted(chosen)), sample_range


def repair(lake: Lake, *, dry_run: bool = True) -> RepairResult:
    """Take every damaged data file out of its table's log, so the lake reads again.

    Each damaged file is moved to ``_quarantine/<table>/`` at the lake root (kept, not deleted)
    and Delta's own repair commits its removal. Rows in it are lost, so every sample whose rows
    it may have held (the file's runs and sample-id range, from the log's statistics) loses its
    completion row too: the next ``vrp ingest run`` with the same options cleans those samples up
    and captures them again. Damaged logs are not repaired here (their tables stay unreadable).
    """
    from vrp.lake.writer import completion_table

    files = _files(lake)
    damaged = [p for p in damaged_files(lake) if p.table not in lake.broken]
    incomplete = incomplete_samples(lake) if not damaged else []
    planned: list[tuple[RepairedFile, str | None]] = []
    for name in TABLES:
        mine = {p.path for p in damaged if p.table == name}
        if not mine:
            continue
        dt = lake.delta(name)
        assert dt is not None
        table_dir = files.table_dir(name)
        for action in pa.table(dt.get_add_actions(flatten=True)).to_pylist():
            path = files.shown(_data_path(table_dir, action["path"]))
            if path not in mine:
                continue
            runs, sample_range = _affected(lake, name, action)
            inner = files.inner(path)
            exists = files.fs.get_file_info(inner).type == pafs.FileType.File
            rel = posixpath.relpath(inner, files.base)
            target = posixpath.join(files.base, QUARANTINE_DIR, rel) if exists else None
            shown_target = files.shown(target) if target else None
            planned.append((RepairedFile(name, path, shown_target, runs, sample_range), target))
    if dry_run or not planned:
        reopened = _reopen_incomplete(lake, incomplete, dry_run=dry_run)
        return RepairResult([item for item, _ in planned], reopened)
    for item, target in planned:
        if target is not None:
            files.fs.create_dir(posixpath.dirname(target), recursive=True)
            files.fs.move(files.inner(item.path), target)
    meta = CommitProperties(custom_metadata=delta.commit_metadata({"operation": "repair"}))
    for name in sorted({item.table for item, _ in planned}):
        dt = lake.delta(name)
        assert dt is not None

        def action(dt: DeltaTable = dt) -> dict:
            dt.update_incremental()
            return dt.repair(dry_run=False, commit_properties=meta)

        delta.retry_commit(action)
    lake.refresh()
    reopened: dict[str, int] = {}
    run_rows = {r["run_id"]: r for r in lake.arrow("runs").to_pylist()} if lake.has_table("runs") else {}
    for item, _ in planned:
        for run_id in item.runs:
            marker = completion_table(run_rows.get(run_id, {}))
            if marker == item.table or lake.delta(marker) is None:
                continue  # the file held completion rows itself: they went with it
            predicate = delta.equals_predicate({"run_id": run_id})
            if item.sample_range is not None:
                low, high = item.sample_range
                predicate += (
                    f" AND sample_id >= {delta.sql_literal(low)} AND sample_id <= {delta.sql_literal(high)}"
                )
            n = delta.delete_where(lake.delta(marker), predicate, {"operation": "repair", "run_id": run_id})
            reopened[run_id] = reopened.get(run_id, 0) + n
            lake.refresh()
    for run_id, n in _reopen_incomplete(lake, incomplete_samples(lake), dry_run=False).items():
        reopened[run_id] = reopened.get(run_id, 0) + n
    return RepairResult([item for item, _ in planned], reopened)


def _reopen_incomplete(lake: Lake, incomplete: list[IncompleteSamples], *, dry_run: bool) -> dict[str, int]:
    """Delete the completion rows of complete samples that lack rows, so the next ingest redoes them."""
    from vrp.lake.writer import completion_table

    by_run: dict[str, set[str]] = {}
    for item in incomplete:
        by_run.setdefault(item.run_id, set()).update(item.sample_ids)
    if dry_run or not by_run:
        return {run_id: len(ids) for run_id, ids in by_run.items()}
    kinds = {r["run_id"]: r for r in lake.arrow("runs", columns=["run_id", "kind"]).to_pylist()}
    reopened = {}
    for run_id, ids in by_run.items():
        marker = lake.delta(completion_table(kinds.get(run_id, {})))
        assert marker is not None
        base = delta.equals_predicate({"run_id": run_id})
        ordered = sorted(ids)
        n = 0
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            n += delta.delete_where(
                marker,
                f"{base} AND {delta.in_predicate('sample_id', chunk)}",
                {"operation": "repair", "run_id": run_id},
            )
        reopened[run_id] = n
    lake.refresh()
    return reopened


def duplicate_keys(lake: Lake, *, limit: int = 20) -> list[DuplicateKey]:
    """Keys (``TableSpec.key``) that more than one row of a table holds, at most `limit` per table.

    Readers assume one row per key (``pope_metrics`` counts samples by their rows), so a key
    stored twice silently doubles a sample's weight in every analysis.
    """
    out = []
    for name, _dt in _readable_tables(lake):
        spec = TABLES[name]
        keys = lake.arrow(name, columns=list(spec.key))
        valid = None
        for column in spec.key:
            present = pc.is_valid(keys.column(column))
            valid = present if valid is None else pc.and_(valid, present)
        if valid is not None and keys.num_rows:
            keys = keys.filter(valid)
        counts = keys.group_by(list(spec.key)).aggregate([([], "count_all")])
        repeated = counts.filter(pc.greater(counts.column("count_all"), 1)).slice(0, limit)
        for row in repeated.to_pylist():
            count = int(row.pop("count_all"))
            out.append(DuplicateKey(name, row, count))
    return out


@dataclass(frozen=True)
class IncompleteSamples:
    """Complete samples (their completion row is committed) that lack their rows in one table."""

    table: str
    run_id: str
    sample_ids: tuple[str, ...]


def incomplete_samples(lake: Lake) -> list[IncompleteSamples]:
    """Samples marked complete whose rows are missing from a table the rest of their run fills.

    A sample's rows in the other tables are committed before its completion row, so a complete
    sample without them means rows were lost (a damaged file repaired by hand, or a writer forced
    over a live one whose in-flight rows it cleaned up). ``repair`` reopens such samples.
    """
    from vrp.lake.writer import PER_SAMPLE_TABLES, completion_table

    if "runs" in lake.broken or not lake.has_table("runs"):
        return []
    out = []
    runs = lake.arrow("runs", columns=["run_id", "kind"]).to_pylist()
    tables = dict(_readable_tables(lake))
    readable = set(tables)
    # runs that ever appended to a table (commit metadata), so a table whose rows of a run were
    # all lost still counts as one the run fills (commits older than the log's retention drop out)
    writers = {
        name: {e["vrp.run_id"] for e in dt.history() if e.get("operation") == "WRITE" and e.get("vrp.run_id")}
        for name, dt in tables.items()
        if name in PER_SAMPLE_TABLES
    }
    for run in runs:
        marker = completion_table(run)
        if marker not in readable:
            continue
        done = set(
            lake.arrow(marker, filter={"run_id": run["run_id"]}, columns=["sample_id"]).column(0).to_pylist()
        )
        for name in PER_SAMPLE_TABLES:
            if name in (marker, "failures") or name not in readable:
                continue
            present = lake.arrow(name, filter={"run_id": run["run_id"]}, columns=["sample_id"]).column(0)
            if len(present) == 0 and run["run_id"] not in writers[name]:
                continue  # the run writes nothing there (e.g. no self-consistency draws)
            missing = done - set(present.to_pylist())
            if missing:
                out.append(IncompleteSamples(name, run["run_id"], tuple(sorted(missing))))
    return out


def vacuum(lake: Lake, *, dry_run: bool = True, min_age_s: float = 3600.0) -> list[Orphan]:
    """Delete (or, dry run, just list) orphans older than `min_age_s`.

    The age guard protects a writer that is still running: its files are orphans until its
    commit lands.
    """
    files = _files(lake)
    selected = [o for o in find_orphans(lake) if o.age_s >= min_age_s]
    if not dry_run:
        for orphan in selected:
            files.fs.delete_file(files.inner(orphan.path))
    return selected


def vacuum_history(lake: Lake, *, retain_hours: int, dry_run: bool = True) -> dict[str, list[str]]:
    """Delta's own vacuum: files removed from the log (by compact, delete, drop-run) more than
    `retain_hours` ago; time travel to versions older than that stops working.

    Delta lists every such file its log still remembers, deleted or not, so only the files still
    in storage are reported: a second vacuum reports nothing instead of the same files again.
    """
    files = _files(lake)
    out = {}
    for name, dt in _readable_tables(lake):
        listed = dt.vacuum(retention_hours=retain_hours, dry_run=True, enforce_retention_duration=False)
        table_dir = files.table_dir(name)
        paths = [_data_path(table_dir, p) for p in listed]
        infos = files.fs.get_file_info(paths) if paths else []
        present = [p for p, info in zip(listed, infos, strict=True) if info.type == pafs.FileType.File]
        if present and not dry_run:
            dt.vacuum(retention_hours=retain_hours, dry_run=False, enforce_retention_duration=False)
        out[name] = present
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
        if lake.has_table(name) and "run_id" in TABLES[name].schema.names:  # images belong to no run
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
