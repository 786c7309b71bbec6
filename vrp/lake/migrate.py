"""`vrp lake migrate`: upgrade an older lake to this VRP's schema version, in place.

Usage::

    report = migrate_lake("vrp-lake")
    report.lines()  # one line per table: created, columns added, or already current

The upgrade is generic, driven by the specs in ``vrp.schema`` alone: for every table it appends
the columns the spec has and the table lacks (null in existing rows, through Delta schema
evolution, so no data file is rewritten), creates tables the lake does not have yet, and only
then records the new version in each table's ``vrp.schema_version`` property. Every step is one
Delta commit, so a migration killed at any point leaves each table either at the old version
(perhaps with some new, empty columns already added) or at the new one; the lake then keeps
refusing to open with the advice to migrate, and running ``vrp lake migrate`` again finishes
the job (added columns are not added twice). Run it while no ingest writes to the lake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable
from deltalake import Field as DeltaField

from vrp.lake import delta, storage
from vrp.lake.errors import LakeError
from vrp.schema import SCHEMA_VERSION, SCHEMA_VERSION_PROPERTY, TABLES, TableSpec


@dataclass
class TableMigration:
    """What migrating one table did (or has to do)."""

    table: str
    found: str | None  # the version before migrating (None: the table did not exist)
    added: list[str] = field(default_factory=list)
    created: bool = False

    def line(self) -> str:
        if self.created:
            return f"{self.table}: created at schema version {SCHEMA_VERSION}"
        if self.found == str(SCHEMA_VERSION) and not self.added:
            return f"{self.table}: already at schema version {SCHEMA_VERSION}"
        added = f", added {', '.join(self.added)}" if self.added else ""
        return f"{self.table}: schema version {self.found} -> {SCHEMA_VERSION}{added}"


@dataclass
class MigrationReport:
    """Per-table outcome of :func:`migrate_lake`."""

    root: str
    tables: list[TableMigration]

    @property
    def changed(self) -> bool:
        return any(t.created or t.added or t.found != str(SCHEMA_VERSION) for t in self.tables)

    def lines(self) -> list[str]:
        return [t.line() for t in self.tables]


def _columns(dt: DeltaTable) -> list[str]:
    return pa.schema(dt.schema().to_arrow()).names


def _plan_table(dt: DeltaTable, spec: TableSpec, path: str) -> TableMigration:
    """Check that `dt` can be brought to `spec` by appending nullable columns; say which ones."""
    found = delta.table_version(dt)
    if found is None or not found.isdigit():
        raise LakeError(
            f"{path} is not a VRP lake table (no {SCHEMA_VERSION_PROPERTY} property); not migrating"
        )
    if int(found) > SCHEMA_VERSION:
        raise LakeError(
            f"lake table '{spec.name}' at {path} has schema version {found}, newer than this VRP's "
            f"{SCHEMA_VERSION}: upgrade VRP instead of migrating the lake"
        )
    names = _columns(dt)
    unknown = [n for n in names if n not in spec.schema.names]
    in_spec_order = [n for n in spec.schema.names if n in names]
    if unknown or in_spec_order != names:
        raise LakeError(
            f"lake table '{spec.name}' at {path} has columns {names}, which schema version {SCHEMA_VERSION} "
            "cannot reach by adding columns; write to a new lake"
        )
    missing = [f for f in spec.schema if f.name not in names]
    required = [f.name for f in missing if not f.nullable]
    if required:
        raise LakeError(
            f"lake table '{spec.name}' at {path} lacks the required columns {required}, which existing rows "
            "cannot fill; write to a new lake"
        )
    return TableMigration(spec.name, found, added=[f.name for f in missing])


def _add_columns(dt: DeltaTable, fields: list[DeltaField], meta: CommitProperties) -> None:
    dt.update_incremental()
    present = set(_columns(dt))
    todo = [f for f in fields if f.name not in present]
    if todo:
        dt.alter.add_columns(todo, commit_properties=meta)


def _set_version(dt: DeltaTable, meta: CommitProperties) -> None:
    dt.update_incremental()
    dt.alter.set_table_properties(
        {SCHEMA_VERSION_PROPERTY: str(SCHEMA_VERSION)}, raise_if_not_exists=False, commit_properties=meta
    )


def migrate_lake(root: str | os.PathLike[str]) -> MigrationReport:
    """Bring every table of the lake at `root` to :data:`SCHEMA_VERSION`; see the module docstring.

    Every table is checked before anything is written, so a lake that cannot be migrated is left
    untouched.
    """
    root = storage.normalize_root(root)
    if not storage.is_remote(root) and not os.path.isdir(root):
        raise LakeError(f"no lake at {root}: nothing to migrate")
    tables = {name: delta.open_raw(root, name) for name in TABLES}
    plans = {
        name: _plan_table(dt, TABLES[name], delta.table_path(root, name))
        for name, dt in tables.items()
        if dt is not None
    }
    meta = CommitProperties(
        custom_metadata=delta.commit_metadata({"operation": "migrate", "schema_version": str(SCHEMA_VERSION)})
    )
    # 1. columns first: a table stays at its old version until every table has its columns
    for name, plan in plans.items():
        dt = tables[name]
        if dt is None:
            continue
        dt.update_incremental()
        present = set(_columns(dt))  # a re-run after a kill: some columns may already be there
        fields = [DeltaField.from_arrow(TABLES[name].schema.field(c)) for c in plan.added if c not in present]
        if fields:
            with storage.translated_errors(delta.table_path(root, name)):
                delta.retry_commit(lambda dt=dt, fields=fields: _add_columns(dt, fields, meta))
    # 2. missing tables, created at the current version
    created = []
    for name, spec in TABLES.items():
        if tables[name] is None:
            delta.ensure_table(root, spec)
            created.append(TableMigration(name, None, created=True))
    # 3. the version property last: from here on the table opens with this VRP
    for name, plan in plans.items():
        dt = tables[name]
        if dt is None or plan.found == str(SCHEMA_VERSION):
            continue
        with storage.translated_errors(delta.table_path(root, name)):
            delta.retry_commit(lambda dt=dt: _set_version(dt, meta))
    outcome = {**{c.table: c for c in created}, **plans}
    report = [outcome[name] for name in TABLES]
    for name in TABLES:  # the upgraded lake must open as a lake of this version
        delta.load_table(root, TABLES[name])
    return MigrationReport(root, report)
