"""RunWriter: crash-safe, resumable, idempotent writes of one run (or one shard of it).

Usage::

    writer = RunWriter(lake_root, run_row, shard=(i, n), owned_sample_ids=my_ids)
    # or, from an open lake: lake.writer(run_row, ...)
    done = writer.begin()                  # clean up a killed attempt, mark the run running
    for batch in batches_without(done):
        writer.commit({"layers": ..., "hidden": ..., "samples": ...})
    writer.finish()

Delta has no cross-table transactions, so completion is defined by the ``samples`` table: each
batch commits every other table first and ``samples`` last, and a sample is complete once its
``samples`` row is committed. A resumed writer deletes its own samples' rows that never got
that far, then writes only what is missing. Every append carries a Delta application
transaction (app id ``"<run_id>:<shard index>/<shard count>"``, version = a per-writer sequence
that continues above the highest version already in the lake), so a commit retried after a
failure is never stored twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake

from vrp.lake import delta, storage
from vrp.lake.errors import LakeError, LakeValidationError
from vrp.lake.heartbeat import Heartbeat
from vrp.lake.identity import canonical_json
from vrp.lake.images import store_images
from vrp.lake.validate import Rows, to_arrow, validate
from vrp.schema import CONDITION_KINDS, SCHEMA_VERSION, TABLES, TableSpec, parse_width_rule

#: Columns a row may omit when the run already says them.
_FILLED_FROM_RUN = ("run_id", "model", "dataset", "split", "base_run_id", "kind")

#: Tables whose rows belong to one sample of a run (cleaned up on resume, unless they are the marker).
PER_SAMPLE_TABLES = tuple(
    name for name, spec in TABLES.items() if name != "runs" and "sample_id" in spec.schema.names
)


def completion_table(run: Mapping[str, Any]) -> str:
    """The table whose committed row marks a sample complete: `samples` for a capture run (an
    image-condition run included), `interventions` for an intervention run (its rows of one sample
    land in one commit)."""
    kind = run.get("kind")
    return "interventions" if kind and kind not in CONDITION_KINDS else "samples"


_DELETE_CHUNK = 500


def _now() -> datetime:
    return datetime.now(UTC)


def _run_config(run: Mapping[str, Any]) -> dict[str, Any]:
    config = run.get("config") or {}
    if isinstance(config, str):
        config = json.loads(config)
    if not isinstance(config, dict):
        raise LakeValidationError("runs", "config", None, "config must be a dict (stored as JSON)")
    return config


def _without(table: pa.Table, sample_ids: set[str]) -> pa.Table:
    """`table` without the rows of `sample_ids` (a table without a sample_id column is kept whole)."""
    if not sample_ids or "sample_id" not in table.column_names or table.num_rows == 0:
        return table
    done = pa.array(sorted(sample_ids), type=pa.string())
    return table.filter(pc.invert(pc.fill_null(pc.is_in(table.column("sample_id"), value_set=done), False)))


def _failure_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two failures rows the same failure (the sample id already hashes its question)."""
    if row.get("sample_id") is not None:
        return (row["sample_id"], row.get("stage"))
    return (None, row.get("question_id"), row.get("stage"))


class RunWriter:
    """Writes the rows of one run (one shard of it) into the lake at `root`; see the module docstring.

    It needs the lake's root only (not a :class:`~vrp.lake.lake.Lake`): writes go straight to each
    table's Delta log, never through a reader's pinned snapshot.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        run: Mapping[str, Any],
        *,
        shard: tuple[int, int] = (0, 1),
        owned_sample_ids: Iterable[str] | None = None,
    ) -> None:
        for column in ("run_id", "model"):
            if not run.get(column):
                raise LakeValidationError("runs", column, None, "the run row needs a non-empty value")
        unknown = [c for c in run if c not in TABLES["runs"].schema.names]
        if unknown:
            raise LakeValidationError("runs", unknown[0], None, "unknown column in the run row")
        index, count = shard
        if not (0 <= index < count):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        if count > 1 and owned_sample_ids is None:
            raise ValueError(
                "a sharded writer must say which samples it owns (owned_sample_ids), so its resume "
                "clean-up never touches another shard's rows"
            )
        self.root = storage.normalize_root(root)
        self.run = dict(run)
        self.config = _run_config(run)
        self.marker = completion_table(run)
        self.run_id: str = str(run["run_id"])
        self.model: str = str(run["model"])
        self.shard = (index, count)
        self.app_id = f"{self.run_id}:{index}/{count}"
        self.owned: frozenset[str] | None = None if owned_sample_ids is None else frozenset(owned_sample_ids)
        self._seq: int | None = None
        self._attempt: int | None = None  # version of a commit that raised before it completed
        self._completed: set[str] = set()
        self._tables: dict[str, DeltaTable] = {}
        self._heartbeat: Heartbeat | None = None

    # ------------------------------------------------------------------ helpers
    def _table(self, name: str) -> DeltaTable:
        if name not in self._tables:
            self._tables[name] = delta.ensure_table(self.root, TABLES[name])
        return self._tables[name]

    def _fill(self, spec: TableSpec) -> dict[str, Any]:
        return {
            c: self.run.get(c)
            for c in _FILLED_FROM_RUN
            if c in spec.schema.names and self.run.get(c) is not None
        }

    def _provenance(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model": self.model,
            "model_revision": self.run.get("model_revision"),
            "code_version": self.run.get("code_version"),
            "schema_version": str(SCHEMA_VERSION),
            "app_id": self.app_id,
        }

    def _column_values(self, name: str, column: str, extra: pc.Expression | None = None) -> pa.Array:
        """Values of `column` in this run's rows of table `name` (latest committed snapshot)."""
        dt = self._table(name)
        dt.update_incremental()
        spec = TABLES[name]
        expr = pc.field("run_id") == self.run_id
        if "model" in spec.partition_by:
            expr = expr & (pc.field("model") == self.model)
        if extra is not None:
            expr = expr & extra
        return dt.to_pyarrow_dataset().to_table(filter=expr, columns=[column]).column(column)

    def _completed_ids(self) -> set[str]:
        return {s for s in self._column_values(self.marker, "sample_id").to_pylist() if s is not None}

    def _check_model_widths(self) -> None:
        """A model keeps one vector width across runs (the `hidden` table is partitioned by model)."""
        keys = {
            parse_width_rule(rule)[1][0]
            for spec in TABLES.values()
            for rule in spec.vectors.values()
            if parse_width_rule(rule)[0] == "run"
        }
        mine = {k: self.config[k] for k in keys if k in self.config}
        if not mine:
            return
        others = (
            self._table("runs")
            .to_pyarrow_dataset()
            .to_table(
                filter=(pc.field("model") == self.model) & (pc.field("run_id") != self.run_id),
                columns=["run_id", "config"],
            )
        )
        for row in others.to_pylist():
            config = json.loads(row["config"] or "{}")
            for key, value in mine.items():
                if key in config and config[key] != value:
                    raise LakeValidationError(
                        "hidden",
                        "h",
                        None,
                        f"model {self.model!r} already has run {row['run_id']} with {key}={config[key]}, "
                        f"this run says {key}={value}; give a different model a different name",
                    )

    def _check_model_identity(self) -> None:
        """A model name stands for one checkpoint: refuse it for another family or checkpoint.

        Every per-model analysis groups by ``model``, so a PaliGemma stored as ``toy-llava`` would
        be pooled with the real one. The same checkpoint moved to another folder (same revision)
        or retrained in place (same source) keeps its name.
        """
        others = (
            self._table("runs")
            .to_pyarrow_dataset()
            .to_table(
                filter=(pc.field("model") == self.model) & (pc.field("run_id") != self.run_id),
                columns=["run_id", "family", "model_source", "model_revision"],
            )
        )
        mine = {c: self.run.get(c) for c in ("family", "model_source", "model_revision")}
        for row in others.to_pylist():
            other_family = row["family"] is not None and mine["family"] is not None
            family_differs = other_family and row["family"] != mine["family"]
            checkpoint_differs = all(
                row[c] is not None and mine[c] is not None and row[c] != mine[c]
                for c in ("model_source", "model_revision")
            )
            if family_differs or checkpoint_differs:
                raise LakeValidationError(
                    "runs",
                    "model",
                    None,
                    f"model name {self.model!r} already belongs to a {row['family']} checkpoint "
                    f"({row['model_source']}, revision {row['model_revision']}, run {row['run_id']}); "
                    f"this run is a {mine['family']} checkpoint ({mine['model_source']}, revision "
                    f"{mine['model_revision']}): rename its folder, or use another lake",
                )

    def _runs_row(self, **values: Any) -> pa.Table:
        row = {k: v for k, v in self.run.items() if k in TABLES["runs"].schema.names}
        row["config"] = canonical_json(self.config)
        row["schema_version"] = SCHEMA_VERSION
        row.update(values)
        return to_arrow(TABLES["runs"], [row])

    def _merge_runs(self, source: pa.Table, update_columns: Iterable[str]) -> None:
        """Upsert this run's ``runs`` row: insert `source`, or update `update_columns` of the stored row.

        A read-modify-write replace of the one row (retried when another commit wins), not Delta's
        MERGE: MERGE writes its strings as Arrow ``string_view``, which Daft and pyarrow < 15 cannot
        read, and ``runs`` must be readable by any engine straight after an ingest.
        """
        dt = self._table("runs")
        spec = TABLES["runs"]
        update = list(update_columns)
        new = source.to_pylist()[0]
        predicate = delta.equals_predicate({"run_id": self.run_id})

        def action() -> None:
            dt.update_incremental()
            stored = dt.to_pyarrow_dataset().to_table(filter=pc.field("run_id") == self.run_id).to_pylist()
            row = dict(stored[0]) if stored else dict(new)
            if stored:
                row.update({c: new[c] for c in update})
            write_deltalake(
                dt,
                to_arrow(spec, [row]),
                mode="overwrite",
                predicate=predicate,
                writer_properties=delta.writer_properties(spec),
                commit_properties=CommitProperties(custom_metadata=delta.commit_metadata(self._provenance())),
            )

        delta.retry_commit(action)

    def _counts(self) -> tuple[int, int]:
        """(complete samples, failed samples not completed since) of the run, over all shards."""
        done = self._completed_ids()
        failed_ids = self._column_values("failures", "sample_id").to_pylist()
        unidentified = sum(1 for s in failed_ids if s is None)  # e.g. images that failed to load
        return len(done), len({s for s in failed_ids if s is not None} - done) + unidentified

    def _cleanup(self, completed: set[str]) -> None:
        """Delete this writer's rows of samples that never got their marker row."""
        meta = {**self._provenance(), "operation": "resume_cleanup"}
        for name in PER_SAMPLE_TABLES:
            if name == self.marker:
                continue
            present = {s for s in self._column_values(name, "sample_id").to_pylist() if s is not None}
            stale = present - completed
            if self.owned is not None:
                stale &= self.owned
            dt = self._table(name)
            base = delta.equals_predicate({"run_id": self.run_id, "model": self.model})
            ordered = sorted(stale)
            for start in range(0, len(ordered), _DELETE_CHUNK):
                chunk = ordered[start : start + _DELETE_CHUNK]
                delta.delete_where(dt, f"{base} AND {delta.in_predicate('sample_id', chunk)}", meta)
            if self.owned is None and name == "failures":
                nulls = self._column_values(name, "sample_id", pc.field("sample_id").is_null())
                if len(nulls):
                    delta.delete_where(dt, f"{base} AND sample_id IS NULL", meta)

    # ------------------------------------------------------------------ public API
    def begin(self, *, force: bool = False) -> set[str]:
        """Prepare a (possibly resumed) run and return the sample ids already complete.

        Refuses (RunBusyError) while another live writer holds the run or an overlapping shard
        of it, unless `force`: its in-flight rows would look stale to the clean-up below. Then
        starts this writer's heartbeat, deletes incomplete rows of the samples this writer owns,
        continues the application transaction sequence above the highest version in the lake,
        and upserts the ``runs`` row with status "running" (``started_at`` of a resumed run is kept).
        """
        for name in TABLES:
            self._table(name)
        self._check_model_identity()
        self._check_model_widths()
        heartbeat = Heartbeat(self.root, self.run_id, shard=self.shard)
        heartbeat.check(force=force)
        heartbeat.start()
        self._heartbeat = heartbeat
        completed = self._completed_ids()
        self._cleanup(completed)
        seq = 0
        for dt in self._tables.values():
            dt.update_incremental()
            seq = max(seq, dt.transaction_version(self.app_id) or 0)
        self._seq = seq
        self._completed = completed
        n_done, n_failed = self._counts()
        source = self._runs_row(
            status="running", started_at=_now(), finished_at=None, n_done=n_done, n_failed=n_failed
        )
        self._merge_runs(source, [c for c in source.column_names if c != "started_at"])
        return set(completed)

    def prepare(self, rows: Mapping[str, Rows]) -> dict[str, tuple[pa.Table, dict[str, int]]]:
        """Convert and validate a batch group without writing (``commit`` calls this first)."""
        prepared: dict[str, tuple[pa.Table, dict[str, int]]] = {}
        for name, data in rows.items():
            if name not in TABLES or name == "runs":
                raise LakeValidationError(
                    name, None, None, "not a table a run writes (the runs row is managed by the writer)"
                )
            spec = TABLES[name]
            table = to_arrow(spec, data, fill=self._fill(spec))
            widths = validate(spec, table, self.config)
            wrong = pc.fill_null(pc.not_equal(table.column("run_id"), self.run_id), True)
            if table.num_rows and pc.any(wrong).as_py():
                i = int(pc.index(wrong, True).as_py())
                sample = table.column("sample_id")[i].as_py() if "sample_id" in table.column_names else None
                raise LakeValidationError(
                    name, "run_id", sample, f"row belongs to another run (writer is {self.run_id})"
                )
            prepared[name] = (table, widths)
        return prepared

    def commit(self, rows: Mapping[str, Rows]) -> None:
        """Commit one batch group: validate everything, then every other table, then the marker.

        ``images`` rows (each picture as the model saw it) go to the shared ``images`` table.
        Rows of samples that are already complete are dropped (they are stored already), so a
        batch committed twice is stored once; a commit retried after an exception reuses its
        version, so it skips the tables its first attempt already committed (their application
        transaction says so). Otherwise the version is above any this app id reached in those
        tables, so a forced second writer of the same run and shard never has its commits skipped.
        """
        if self._seq is None:
            raise LakeError("call begin() before commit(): it cleans up an interrupted attempt first")
        rows = dict(rows)
        # pictures first, into the shared `images` table (keyed by content, no run): one without
        # its samples row is harmless, and a retried commit inserts none twice (a MERGE on the hash)
        pictures = rows.pop("images", None)
        if pictures:
            store_images(self.root, pictures)
        prepared = self.prepare(rows)
        # samples another writer completed since begin() (a forced overlap, a shard of another
        # layout) are stored already: drop them, re-reading the marker table right now
        self._completed |= self._completed_ids()
        prepared = {name: (_without(table, self._completed), w) for name, (table, w) in prepared.items()}
        if not any(table.num_rows for table, _ in prepared.values()):
            return
        order = [n for n in prepared if n != self.marker] + ([self.marker] if self.marker in prepared else [])
        if self._attempt is not None:
            seq = self._attempt  # a retry of a commit that failed part-way: the same version
        else:
            # above every version of this app id in the tables it writes: another writer of the
            # same run and shard (a forced overlap) may have used versions since, and a commit at
            # a version already reached would be skipped as stored
            seq = max([self._seq, *(self._txn_version(name) for name in order)]) + 1
        self._attempt = seq
        sample_ids: set[str] = set()
        for name in order:
            table, widths = prepared[name]
            if name == self.marker:
                # once more just before the marker: a sample's marker row is committed at most once
                self._completed |= self._completed_ids()
                table = _without(table, self._completed)
                sample_ids = set(table.column("sample_id").to_pylist())
            if table.num_rows == 0:
                continue
            meta = {**self._provenance(), "seq": str(seq), "table": name, "vector_widths": widths or None}
            delta.append(
                self._table(name), TABLES[name], table, app_id=self.app_id, version=seq, metadata=meta
            )
        self._seq = seq
        self._attempt = None
        self._completed |= sample_ids

    def _txn_version(self, name: str) -> int:
        dt = self._table(name)
        dt.update_incremental()
        return dt.transaction_version(self.app_id) or 0

    def fail(self, rows: list[dict[str, Any]]) -> None:
        """Record per-sample failures (sample_id, stage, error); a resume retries those samples.

        A failure already recorded for this run (same sample id and stage; same question id and
        stage for a failure without a sample id) is not recorded again: load failures of questions
        no shard owns would otherwise pile up on every resume.
        """
        if self._seq is None:
            raise LakeError("call begin() before fail()")
        existing = self._table("failures")
        existing.update_incremental()
        recorded = existing.to_pyarrow_dataset().to_table(
            filter=(pc.field("run_id") == self.run_id) & (pc.field("model") == self.model),
            columns=["sample_id", "question_id", "stage"],
        )
        seen = {_failure_key(r) for r in recorded.to_pylist()}
        now = _now()
        fresh = [{"failed_at": now, **row} for row in rows if _failure_key(row) not in seen]
        if fresh:
            self.commit({"failures": fresh})

    def finish(self, status: str = "complete") -> None:
        """Set the run's status, finish time and counts (done, failed) over all shards (MERGE)."""
        n_done, n_failed = self._counts()
        source = self._runs_row(
            status=status, started_at=_now(), finished_at=_now(), n_done=n_done, n_failed=n_failed
        )
        self._merge_runs(source, ["status", "finished_at", "n_done", "n_failed", "code_version"])
        self.close()

    def close(self) -> None:
        """Stop this writer's heartbeat (``finish`` does it; call it when a run stops on an error)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
