"""`vrp lake migrate` upgrades a version-1 lake in place; a killed migration is re-runnable.

The version-1 lake is built from rows that today's ingest and intervention code wrote, copied
into Delta tables created with the version-1 columns (listed here by hand from schema version 1)
and the version-1 property, the way a VRP of schema version 1 left them on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from deltalake import DeltaTable, write_deltalake

from vrp.cli import main
from vrp.ingest.datasets.shapes import generate_shapes_pope
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.interventions import plan_mask, run_intervention
from vrp.lake import LakeSchemaVersionError, open_lake
from vrp.schema import SCHEMA_VERSION, SCHEMA_VERSION_PROPERTY, TABLES

TOY = Path(__file__).resolve().parents[2] / "vrp" / "toys" / "toy-llava"

# Columns schema version 2 added, per table (every other column existed in version 1).
ADDED_IN_V2 = {
    "samples": [
        "task",
        "answers",
        "score",
        "question_type",
        "answer_type",
        "source",
        "truth_prob",
        "truth_margin",
        "truth_rank",
        "first_token_kl",
    ],
    "layers": ["lens_truth_rank"],
    "generations": ["score"],
    "interventions": [
        "score",
        "truth_prob",
        "truth_margin",
        "token_entropy",
        "donor_sample_id",
        "restoration",
    ],
}
# The pictures (also schema version 2): a column and two tables, absent from a version-1 lake.
ADDED_PICTURES = {"samples": ["image_hash"]}
# Several grids per image (also schema version 2): the tile of a map, each map's own metrics.
ADDED_MULTI_GRID = {
    "samples": ["n_grids"],
    "attention_maps": ["tile", "mass", "spatial_entropy", "spatial_entropy_norm", "cluster_count"],
}
PICTURE_TABLES = ("evidence_maps", "images")
# A table the version-1 lake lacks (never written there), which migrate must create.
ABSENT = "probe_neurons"
QUIET = {"echo": lambda _line: None}


def _v1_schema(name: str) -> pa.Schema:
    spec = TABLES[name]
    added = ADDED_IN_V2.get(name, []) + ADDED_PICTURES.get(name, []) + ADDED_MULTI_GRID.get(name, [])
    keep = [f for f in spec.schema if f.name not in added]
    return pa.schema(keep)


def _sorted(table: pa.Table, name: str) -> pa.Table:
    return table.sort_by([(c, "ascending") for c in TABLES[name].key if c in table.column_names])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, pa.Table]:
    """Rows written by today's ingest (self-consistency on) and a mask run, per table."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("migrate-source")
    data = generate_shapes_pope(root / "shapes", images=1, seed=3)
    lake_dir = str(root / "lake")
    options = IngestOptions(model=str(TOY), data_dir=str(data), limit=2, batch_size=2, self_consistency=2)
    run_id = run_ingest(options, lake_dir, **QUIET).run_id
    plan = plan_mask(open_lake(lake_dir), run_id, ratio=0.5, conditions=("full",))
    run_intervention(plan, lake_dir, **QUIET)
    lake = open_lake(lake_dir)
    tables = {
        name: lake.arrow(name)
        for name in TABLES
        if name != ABSENT and name not in PICTURE_TABLES and lake.has_table(name)
    }
    assert {"runs", "samples", "layers", "generations", "interventions", "hidden"} <= set(tables)
    return {"data": data, **tables}


def _write_v1_lake(root: Path, source: dict) -> dict[str, pa.Table]:
    """The version-1 lake: the source rows' version-1 columns in version-1 Delta tables."""
    written = {}
    for name, table in source.items():
        if name == "data":
            continue
        spec = TABLES[name]
        schema = _v1_schema(name)
        DeltaTable.create(
            str(root / name),
            schema,
            partition_by=list(spec.partition_by) or None,
            configuration={SCHEMA_VERSION_PROPERTY: "1"},
            raise_if_key_not_exists=False,
        )
        rows = table.select(schema.names).cast(schema)
        write_deltalake(str(root / name), rows, mode="append")
        written[name] = rows
    return written


def _version(root: Path, name: str) -> str:
    return DeltaTable(str(root / name)).metadata().configuration[SCHEMA_VERSION_PROPERTY]


def _assert_migrated(root: Path, v1: dict[str, pa.Table]) -> None:
    lake = open_lake(root)  # opens without error: every table is at the current version
    for name in TABLES:
        assert _version(root, name) == str(SCHEMA_VERSION), name
        assert lake.dataset(name).schema.names == TABLES[name].schema.names, name
    assert lake.arrow(ABSENT).num_rows == 0
    assert all(lake.arrow(name).num_rows == 0 for name in PICTURE_TABLES)
    for name, old in v1.items():
        now = _sorted(lake.arrow(name), name)
        assert now.num_rows == old.num_rows
        assert now.select(old.column_names).equals(_sorted(old, name)), name
        added = ADDED_IN_V2.get(name, []) + ADDED_PICTURES.get(name, []) + ADDED_MULTI_GRID.get(name, [])
        for column in added:
            assert now.column(column).null_count == now.num_rows, (name, column)


def test_a_version_1_lake_is_refused_with_the_way_to_upgrade(tmp_path, source) -> None:
    _write_v1_lake(tmp_path / "lake", source)
    with pytest.raises(LakeSchemaVersionError) as info:
        open_lake(tmp_path / "lake")
    assert "vrp lake migrate --lake" in str(info.value) and "schema version 1" in str(info.value)
    args = ["query", "select count(*) from samples", "--lake", str(tmp_path / "lake")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "vrp lake migrate" in result.output
    assert "Traceback" not in result.output


def test_migrate_upgrades_in_place_and_a_new_run_writes_to_it(tmp_path, source) -> None:
    root = tmp_path / "lake"
    v1 = _write_v1_lake(root, source)
    result = CliRunner().invoke(main, ["lake", "migrate", "--lake", str(root)])
    assert result.exit_code == 0, result.output
    assert f"samples: schema version 1 -> {SCHEMA_VERSION}, added task, answers" in result.output
    assert "truth_rank, first_token_kl, image_hash, n_grids" in result.output
    assert "attention_maps: schema version 1 -> 2, added tile, mass, spatial_entropy" in result.output
    for name in (ABSENT, *PICTURE_TABLES):
        assert f"{name}: created" in result.output
    _assert_migrated(root, v1)
    again = CliRunner().invoke(main, ["lake", "migrate", "--lake", str(root)])
    assert again.exit_code == 0 and "nothing to do" in again.output
    _assert_migrated(root, v1)

    # the writer appends to the migrated tables (a run of this version is a new run)
    options = IngestOptions(
        model=str(TOY), data_dir=str(source["data"]), limit=1, batch_size=1, self_consistency=1
    )
    run_ingest(options, str(root), **QUIET)
    samples = open_lake(root).arrow("samples")
    assert samples.num_rows == v1["samples"].num_rows + 1
    assert len(set(samples.column("run_id").to_pylist())) == 2


@pytest.mark.parametrize(("step", "calls"), [("_add_columns", 3), ("_set_version", 4)])
def test_a_migration_killed_midway_leaves_each_table_old_or_new_and_reruns(
    tmp_path, source, step, calls
) -> None:
    root = tmp_path / "lake"
    v1 = _write_v1_lake(root, source)
    # the child SIGKILLs itself right before its `calls`-th commit of `step`
    script = (
        "import os, signal, sys\n"
        "import vrp.lake.migrate as m\n"
        f"real = m.{step}\n"
        "seen = []\n"
        "def dying(*args, **kwargs):\n"
        "    seen.append(1)\n"
        f"    if len(seen) == {calls}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args, **kwargs)\n"
        f"m.{step} = dying\n"
        "m.migrate_lake(sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    child = subprocess.run([sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr

    versions = {name: _version(root, name) for name in v1}
    assert set(versions.values()) <= {"1", str(SCHEMA_VERSION)}
    assert "1" in versions.values()
    if step == "_set_version":
        assert sum(v == str(SCHEMA_VERSION) for v in versions.values()) == calls - 1
    else:  # the first tables have their new columns already, still at version 1
        assert set(versions.values()) == {"1"}
    with pytest.raises(LakeSchemaVersionError, match="vrp lake migrate"):
        open_lake(root)
    for name, old in v1.items():  # no row lost or changed, whatever the table's state
        now = _sorted(DeltaTable(str(root / name)).to_pyarrow_table(), name)
        assert now.select(old.column_names).equals(_sorted(old, name)), name

    result = CliRunner().invoke(main, ["lake", "migrate", "--lake", str(root)])
    assert result.exit_code == 0, result.output
    _assert_migrated(root, v1)


def test_a_lake_that_cannot_be_reached_by_adding_columns_is_left_untouched(tmp_path, source) -> None:
    root = tmp_path / "lake"
    _write_v1_lake(root, source)
    odd = pa.schema([pa.field("run_id", pa.string(), nullable=False), pa.field("mystery", pa.int64())])
    DeltaTable.create(
        str(root / ABSENT), odd, configuration={SCHEMA_VERSION_PROPERTY: "1"}, raise_if_key_not_exists=False
    )
    result = CliRunner().invoke(main, ["lake", "migrate", "--lake", str(root)])
    assert result.exit_code != 0 and "cannot reach by adding columns" in result.output
    assert all(_version(root, name) == "1" for name in ("samples", "layers", "runs"))
    assert "task" not in DeltaTable(str(root / "samples")).schema().to_arrow().names


def test_a_current_lake_lacking_columns_added_since_is_told_to_migrate(tmp_path, source) -> None:
    """Same schema version, fewer columns (the patch columns came after version 2 shipped)."""
    later = ("token_entropy", "donor_sample_id", "restoration")
    root = tmp_path / "lake"
    for name, table in source.items():
        if name == "data":
            continue
        spec = TABLES[name]
        schema = pa.schema([f for f in spec.schema if name != "interventions" or f.name not in later])
        DeltaTable.create(
            str(root / name),
            schema,
            partition_by=list(spec.partition_by) or None,
            configuration={SCHEMA_VERSION_PROPERTY: str(SCHEMA_VERSION)},
            raise_if_key_not_exists=False,
        )
        write_deltalake(str(root / name), table.select(schema.names).cast(schema), mode="append")
    with pytest.raises(Exception, match="run `vrp lake migrate --lake .*` to add them") as info:
        open_lake(root)
    assert "donor_sample_id" in str(info.value)
    result = CliRunner().invoke(main, ["lake", "migrate", "--lake", str(root)])
    assert result.exit_code == 0, result.output
    assert (
        f"interventions: schema version {SCHEMA_VERSION} -> {SCHEMA_VERSION}, added token_entropy, "
        "donor_sample_id, restoration" in result.output
    )
    interventions = open_lake(root).arrow("interventions")
    assert interventions.column("restoration").null_count == interventions.num_rows > 0
