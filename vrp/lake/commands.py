"""`vrp query` (read-only SQL over the lake) and `vrp lake ...` (info, check, repair, vacuum, compact,
drop-run)."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import click
import pyarrow as pa

from vrp.cli.options import format_option, lake_option, lake_root, open_existing_lake, user_errors
from vrp.lake import maintenance
from vrp.lake.errors import LakeError
from vrp.lake.query import list_queries, named_query, one_line, run_query
from vrp.schema import SCHEMA_VERSION

TABLE_ROWS_ON_SCREEN = 200


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _plain(value: Any) -> Any:
    """A JSON-ready value: non-finite floats become null, times ISO strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(_plain(value))
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def format_result(table: pa.Table, fmt: str, *, limit_rows: bool) -> str:
    """Render a result as text: an aligned table, CSV (vectors as JSON lists) or a JSON array."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in _rows(table):
            writer.writerow([_csv_cell(v) for v in row.values()])
        return buffer.getvalue()
    if fmt == "json":
        return json.dumps([_plain(r) for r in _rows(table)], indent=1, allow_nan=False) + "\n"
    import polars as pl

    shown_rows = table.slice(0, TABLE_ROWS_ON_SCREEN) if limit_rows else table
    frame = pl.from_arrow(shown_rows)
    assert isinstance(frame, pl.DataFrame)
    config = {"tbl_rows": -1, "tbl_cols": -1, "fmt_str_lengths": 60, "tbl_width_chars": 200}
    with pl.Config(**config, tbl_hide_dataframe_shape=True):
        text = str(frame)
    note = f"\n{table.num_rows} rows"
    if frame.height < table.num_rows:
        note += f" (first {TABLE_ROWS_ON_SCREEN} shown; use --format csv or --out)"
    return text + note + "\n"


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The rows as dicts, a few thousand at a time: a waiting thread (Ctrl-C, --timeout) gets to
    run between chunks, where one ``to_pylist`` of millions of rows would hold the GIL throughout."""
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


@click.command()
@lake_option
@format_option("table", "csv", "json", "parquet", help="Output format (parquet needs --out).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the result to this file.")
@click.option("--name", default=None, help="Run the named query vrp/queries/NAME.sql instead of SQL.")
@click.option("--list", "list_names", is_flag=True, help="List the named queries and exit.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Cancel the query if it runs longer than this (default: no limit).",
)
@click.argument("sql", required=False)
def query(
    lake_dir: str | None,
    fmt: str,
    out: str | None,
    name: str | None,
    list_names: bool,
    timeout: float | None,
    sql: str | None,
) -> None:
    """Run one read-only SQL statement (SELECT or EXPLAIN) over the lake's tables.

    Tables: runs, samples, failures, layers, heads, attention_maps, evidence_maps, images, hidden,
    generations, probe_layers, probe_neurons, interventions. Join on run_id and sample_id. SQL "-" reads
    the statement from stdin. Vectors come back as FLOAT[]; cast (h::FLOAT[n]) for array_* functions.
    """
    if list_names:
        for query_name, title in list_queries():
            click.echo(f"{query_name:32s} {title}")
        return
    if name is not None and sql is not None:
        raise click.UsageError("give either SQL or --name, not both")
    try:
        if name is not None:
            sql = named_query(name)
        elif sql == "-":
            sql = sys.stdin.read()
        if sql is None:
            raise click.UsageError("give a SQL statement, --name NAME or --list")
        if fmt == "parquet" and out is None:
            raise click.UsageError("--format parquet needs --out FILE")
        lake = open_existing_lake(lake_dir)

        def render(result: pa.Table) -> tuple[int, str | None]:
            # inside run_query, so --timeout covers turning a large result into text too
            if fmt == "parquet":
                import pyarrow.parquet as pq

                try:
                    pq.write_table(result, out, compression="zstd")
                except OSError as exc:
                    raise LakeError(f"cannot write {out}: {one_line(str(exc))}") from exc
                return result.num_rows, None
            return result.num_rows, format_result(result, fmt, limit_rows=out is None)

        n_rows, text = run_query(lake, sql, timeout=timeout, render=render)
    except LakeError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt as exc:  # before the statement started (run_query handles it after)
        raise click.ClickException("query cancelled (Ctrl-C); nothing was written") from exc
    if text is None:
        click.echo(f"wrote {n_rows} rows to {out}", err=True)
    elif out is None:
        click.echo(text, nl=False)
    else:
        try:
            with open(out, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from exc
        click.echo(f"wrote {n_rows} rows to {out}", err=True)


@click.group()
def lake() -> None:
    """Inspect and maintain the activation lake (a folder of Delta tables)."""


@lake.command()
@lake_option
def info(lake_dir: str | None) -> None:
    """Tables (version, files, rows, bytes) and runs."""
    the_lake = open_existing_lake(lake_dir)
    click.echo(f"lake {the_lake.root}")
    click.echo(f"{'table':16s} {'version':>7s} {'files':>6s} {'rows':>10s} {'size':>10s}")
    for t in maintenance.table_info(the_lake):
        click.echo(f"{t.name:16s} {t.version:7d} {t.files:6d} {t.rows:10d} {_human_bytes(t.bytes):>10s}")
    if the_lake.has_table("runs"):
        runs = the_lake.sql(
            "SELECT run_id, model, dataset, split, status, n_done, n_failed, base_run_id "
            "FROM runs ORDER BY started_at"
        ).to_arrow_table()
        click.echo(f"\nruns ({runs.num_rows})")
        for r in runs.to_pylist():
            base = f" base={r['base_run_id']}" if r["base_run_id"] else ""
            click.echo(
                f"  {r['run_id']}  {r['model']}  {r['dataset']}/{r['split']}  {r['status']}  "
                f"done={r['n_done']} failed={r['n_failed']}{base}"
            )


@lake.command()
@lake_option
def check(lake_dir: str | None) -> None:
    """Verify every committed file (exists, size as logged, Parquet footer reads); list orphans."""
    the_lake = open_existing_lake(lake_dir)
    problems, orphans = maintenance.check(the_lake)
    for p in problems:
        click.echo(f"DAMAGED {p.table}: {p.path}: {maintenance_one_line(p.problem)}")
    for o in orphans:
        click.echo(f"ORPHAN  {o.table}: {o.path} ({_human_bytes(o.bytes)}, {o.age_s / 60:.0f} min old)")
    duplicates = maintenance.duplicate_keys(the_lake) if not problems else []
    for d in duplicates:
        key = ", ".join(f"{k}={v}" for k, v in d.key.items())
        click.echo(f"DUPLICATE {d.table}: {key} ({d.count} rows)")
    incomplete = maintenance.incomplete_samples(the_lake) if not problems else []
    for i in incomplete:
        click.echo(
            f"INCOMPLETE {i.table}: run {i.run_id}: {len(i.sample_ids)} complete sample(s) without rows "
            f"there (e.g. {i.sample_ids[0]})"
        )
    n_files = sum(t.files for t in maintenance.table_info(the_lake))
    click.echo(f"checked {n_files} committed files: {len(problems)} damaged, {len(orphans)} orphan(s)")
    if orphans:
        click.echo("orphans are files no commit references (killed writers); `vrp lake vacuum` removes them")
    if incomplete and not duplicates:
        raise click.ClickException(
            f"{sum(len(i.sample_ids) for i in incomplete)} complete sample(s) lack rows: `vrp lake repair "
            "--yes` reopens them, and the next `vrp ingest run` of their run captures them again"
        )
    if duplicates:
        runs = sorted({str(d.key.get("run_id")) for d in duplicates})
        raise click.ClickException(
            f"{len(duplicates)} key(s) stored more than once (two writers of one run overlapped): drop "
            f"the affected run(s) ({', '.join(runs)}) with `vrp lake drop-run` and ingest them again"
        )
    if problems:
        logs = [p for p in problems if p.table in the_lake.broken]
        what = []
        if len(logs) < len(problems):
            what.append(
                f"{len(problems) - len(logs)} damaged data file(s): `vrp lake repair` takes them out of the "
                "log (the samples they held are ingested again by the next `vrp ingest run`), or restore "
                "them from a backup"
            )
        if logs:
            what.append(
                f"{len(logs)} damaged table log(s) ({', '.join(p.table for p in logs)}): restore the named "
                "log file from a backup; the other tables read as usual"
            )
        raise click.ClickException("; ".join(what))


@lake.command()
@lake_option
@click.option("--yes", is_flag=True, help="Really repair (default: dry run, only list).")
def repair(lake_dir: str | None, yes: bool) -> None:
    """Take damaged data files (found by `vrp lake check`) out of their tables' logs.

    The damaged files are moved to _quarantine/ at the lake root; the samples whose rows they may
    have held are marked incomplete, so the next `vrp ingest run` of their runs (same options)
    captures them again. Complete samples that lack rows in a table (INCOMPLETE in `check`) are
    reopened the same way. Damaged Delta logs are not repaired: restore those files from a backup.
    """
    the_lake = open_existing_lake(lake_dir)
    result = maintenance.repair(the_lake, dry_run=not yes)
    verb = "removed" if yes else "would remove"
    for f in result.files:
        samples = f"samples {f.sample_range[0]}..{f.sample_range[1]}" if f.sample_range else "all samples"
        runs = ", ".join(f.runs) or "no known run"
        kept = f" (kept at {f.moved_to})" if yes and f.moved_to else ""
        click.echo(f"{verb} {f.table}: {f.path}{kept}; {samples} of run(s) {runs} to ingest again")
    for run_id, n in result.reopened.items():
        done = "reopened" if yes else "to reopen"
        click.echo(f"run {run_id}: {n} complete sample(s) {done}; rerun its `vrp ingest run` to capture them")
    for name, error in the_lake.broken.items():
        click.echo(
            f"not repaired: table {name} has a damaged log ({error.log_file}); restore it from a backup"
        )
    click.echo(f"{verb} {len(result.files)} damaged file(s)")
    if not yes and (result.files or result.reopened):
        click.echo("dry run: pass --yes to repair")


def maintenance_one_line(text: str) -> str:
    return " ".join(str(text).split())


@lake.command()
@lake_option
@click.option("--yes", is_flag=True, help="Really delete (default: dry run, only list).")
@click.option(
    "--min-age-minutes",
    type=float,
    default=60.0,
    show_default=True,
    help="Only orphans older than this (a running writer's files are orphans until it commits).",
)
@click.option(
    "--retain-hours",
    type=int,
    default=None,
    help="Also delete files the log removed (compact, drop-run) more than this many hours ago; "
    "time travel before then stops working.",
)
def vacuum(lake_dir: str | None, yes: bool, min_age_minutes: float, retain_hours: int | None) -> None:
    """Remove orphan files left by killed writers (dry run unless --yes)."""
    the_lake = open_existing_lake(lake_dir)
    orphans = maintenance.vacuum(the_lake, dry_run=not yes, min_age_s=min_age_minutes * 60)
    verb = "removed" if yes else "would remove"
    for o in orphans:
        click.echo(f"{verb} {o.path} ({_human_bytes(o.bytes)})")
    click.echo(f"{verb} {len(orphans)} orphan file(s), {_human_bytes(sum(o.bytes for o in orphans))}")
    if retain_hours is not None:
        history = maintenance.vacuum_history(the_lake, retain_hours=retain_hours, dry_run=not yes)
        n = sum(len(v) for v in history.values())
        click.echo(f"{verb} {n} file(s) removed from the log more than {retain_hours} h ago")
    if not yes and orphans:
        click.echo("dry run: pass --yes to delete")


@lake.command()
@lake_option
def compact(lake_dir: str | None) -> None:
    """Merge small files (Delta optimize) in every table; readers see the same rows."""
    the_lake = open_existing_lake(lake_dir)
    for name, metrics in maintenance.compact(the_lake).items():
        removed, added = metrics.get("numFilesRemoved", 0), metrics.get("numFilesAdded", 0)
        click.echo(f"{name:16s} files removed {removed}, added {added}")
    click.echo("old files stay for time travel; `vrp lake vacuum --retain-hours H --yes` deletes them")


@lake.command()
@lake_option
def migrate(lake_dir: str | None) -> None:
    """Upgrade a lake written by an older VRP to this VRP's schema version, in place.

    Adds the columns this version has and the lake lacks (empty for existing rows; no data file
    is rewritten), creates missing tables, then records the new version. Safe to re-run, also
    after an interrupted migration. Stop any ingest writing to the lake first.
    """
    from vrp.lake.migrate import migrate_lake

    with user_errors(LakeError):
        report = migrate_lake(lake_root(lake_dir))
    for line in report.lines():
        click.echo(line)
    done = "" if report.changed else " (nothing to do)"
    click.echo(f"lake {report.root} is at schema version {SCHEMA_VERSION}{done}")


@lake.command("drop-run")
@lake_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.argument("run_id")
def drop_run(lake_dir: str | None, yes: bool, run_id: str) -> None:
    """Delete every row of RUN_ID from every table (after a confirmation)."""
    the_lake = open_existing_lake(lake_dir)
    counts = maintenance.run_rows(the_lake, run_id)
    if not counts:
        raise click.ClickException(f"no rows of run {run_id} in {the_lake.root} (see vrp lake info)")
    click.echo(f"run {run_id}: " + ", ".join(f"{n} rows in {t}" for t, n in counts.items()))
    if not yes:
        click.confirm("delete them?", abort=True)
    deleted = maintenance.drop_run(the_lake, run_id)
    click.echo(f"deleted {sum(deleted.values())} rows of run {run_id} from {len(deleted)} table(s)")


@lake.command()
@lake_option
@click.option(
    "--to", "dest", required=True, metavar="DIR|s3://...", help="Empty directory or object-store prefix."
)
def export(lake_dir: str | None, dest: str) -> None:
    """Copy a consistent snapshot (one version of each table) with a README card for collaborators."""
    from vrp.lake.export import CARD_NAME, export_lake

    the_lake = open_existing_lake(lake_dir)
    try:
        exported = export_lake(the_lake, dest)
    except LakeError as exc:
        raise click.ClickException(str(exc)) from exc
    for t in exported:
        click.echo(f"{t.name:16s} version {t.source_version:5d}  {t.rows:10d} rows")
    click.echo(f"exported {len(exported)} tables to {dest} (card: {CARD_NAME})")
