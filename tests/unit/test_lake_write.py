"""In-process behaviour of the lake writer and reader: validation, idempotence, resume, round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from lake_util import HIDDEN, ROWS_PER_SAMPLE, batch_rows, ingest, make_run, sample_ids

from vrp.lake import LakeError, LakeValidationError, delta, open_lake, to_matrix
from vrp.schema import TABLES


def _counts(root) -> dict[str, int]:
    lake = open_lake(root)
    return {name: lake.arrow(name).num_rows for name in TABLES}


def _snapshot(root) -> tuple[dict[str, int], dict[str, int]]:
    lake = open_lake(root)
    return lake.versions(), _counts(root)


# --------------------------------------------------------------------------- validation
BAD_BATCHES = [
    # (table, column, sample named in the error, how to spoil a good batch of t0000 and t0001)
    ("layers", "image_mass", "t0001", lambda r: r["layers"][2].update(image_mass=float("nan"))),
    ("samples", "p_yes", "t0000", lambda r: r["samples"][0].update(p_yes=float("inf"))),
    ("hidden", "h", "t0001", lambda r: r["hidden"][5]["h"].__setitem__(3, -np.inf)),
    ("hidden", "h", "t0001", lambda r: r["hidden"][4].update(h=np.zeros(HIDDEN + 1, dtype=np.float32))),
    ("attention_maps", "map", "t0000", lambda r: r["attention_maps"][1].update(grid_w=4)),
    ("heads", "nonsense", "t0000", lambda r: r["heads"][0].update(nonsense=1)),
    ("layers", "layer", "t0000", lambda r: r["layers"][0].update(layer=None)),
    ("layers", None, "t0000", lambda r: r["layers"].append(dict(r["layers"][0]))),
]


@pytest.mark.parametrize(("table", "column", "sample", "mutate"), BAD_BATCHES)
def test_bad_values_are_rejected_before_anything_is_written(tmp_path, table, column, sample, mutate):
    run = make_run()
    ingest(str(tmp_path), run, sample_ids(2))  # the lake already holds a good batch
    writer = open_lake(tmp_path).writer(run)
    writer.begin()
    before = _snapshot(tmp_path)
    rows = batch_rows(["t0000", "t0001"])
    mutate(rows)
    with pytest.raises(LakeValidationError) as info:
        writer.commit(rows)
    err = info.value
    assert (err.table, err.column, err.sample_id) == (table, column, sample)
    assert table in str(err) and "nothing was written" in str(err)
    assert _snapshot(tmp_path) == before


def test_width_comes_from_the_run_config_and_one_model_keeps_one_width(tmp_path):
    ingest(str(tmp_path), make_run("run-a", hidden_size=8), sample_ids(2))
    ingest(
        str(tmp_path), make_run("run-b", model="other", hidden_size=16), sample_ids(2)
    )  # another model: fine
    lake = open_lake(tmp_path)
    widths = lake.sql(
        "SELECT model, min(len(h)), max(len(h)) FROM hidden GROUP BY model ORDER BY model"
    ).fetchall()
    assert widths == [("other", 16, 16), ("toy-llava", 8, 8)]
    with pytest.raises(LakeValidationError, match="hidden_size=8"):
        lake.writer(make_run("run-c", hidden_size=16)).begin()
    no_width = make_run("run-d", model="third")
    no_width["config"] = {"seed": 0}
    writer = lake.writer(no_width)
    writer.begin()
    with pytest.raises(LakeValidationError, match="hidden_size"):
        writer.commit(batch_rows(["s0000"], tables=["hidden"]))


# --------------------------------------------------------------------------- idempotence
def test_append_with_the_same_application_transaction_is_stored_once(tmp_path):
    spec = TABLES["layers"]
    dt = delta.ensure_table(str(tmp_path), spec)
    data = pa.table(
        {"run_id": ["r"] * 3, "sample_id": ["a", "b", "c"], "model": ["m"] * 3, "layer": [0, 0, 0]}
    )
    from vrp.lake.validate import to_arrow

    table = to_arrow(spec, data)
    assert delta.append(dt, spec, table, app_id="r:0/1", version=1) is True
    assert delta.append(DeltaTable(dt.table_uri), spec, table, app_id="r:0/1", version=1) is False
    assert delta.append(dt, spec, table, app_id="r:0/1", version=2) is True
    assert DeltaTable(dt.table_uri).to_pyarrow_table().num_rows == 6
    assert DeltaTable(dt.table_uri).transaction_version("r:0/1") == 2


def test_a_commit_retried_after_a_failure_midway_is_stored_once(tmp_path, monkeypatch):
    run = make_run()
    writer = open_lake(tmp_path).writer(run)
    writer.begin()
    real = delta.append
    calls = []

    def flaky(dt, spec, data, **kw):
        calls.append(spec.name)
        if spec.name == "hidden" and calls.count("hidden") == 1:
            raise OSError("disk hiccup")
        return real(dt, spec, data, **kw)

    monkeypatch.setattr(delta, "append", flaky)
    rows = batch_rows(["s0000", "s0001"])
    with pytest.raises(OSError):
        writer.commit(rows)
    writer.commit(rows)  # the retry: tables committed by the first attempt are skipped
    writer.commit(rows)  # committing a complete batch again is a no-op
    counts = _counts(tmp_path)
    for name, per in ROWS_PER_SAMPLE.items():
        assert counts[name] == 2 * per, name


def test_rows_of_already_complete_samples_are_not_stored_again(tmp_path):
    writer = open_lake(tmp_path).writer(make_run())
    writer.begin()
    writer.commit(batch_rows(["s0000", "s0001"]))
    writer.commit(batch_rows(["s0001", "s0002"]))  # overlaps the first batch by one sample
    lake = open_lake(tmp_path)
    for name, per in ROWS_PER_SAMPLE.items():
        got = dict(lake.sql(f"SELECT sample_id, count(*) FROM {name} GROUP BY 1").fetchall())
        assert got == {"s0000": per, "s0001": per, "s0002": per}, name


def test_the_same_configuration_twice_adds_nothing(tmp_path):
    run = make_run()
    ingest(str(tmp_path), run, sample_ids(5))
    first = _counts(tmp_path)
    done, written = ingest(str(tmp_path), run, sample_ids(5))
    assert done == set(sample_ids(5)) and written == []
    assert _counts(tmp_path) == first
    for name, per in ROWS_PER_SAMPLE.items():
        assert first[name] == 5 * per


def test_an_interrupted_run_resumes_and_writes_only_the_missing_samples(tmp_path):
    run = make_run()
    ids = sample_ids(7)
    done, written = ingest(str(tmp_path), run, ids, batch_size=2, stop_after_batches=2, finish=False)
    assert done == set() and written == ids[:4]
    lake = open_lake(tmp_path)
    status, started = lake.sql("SELECT status, started_at FROM runs").fetchall()[0]
    assert status == "running"
    done, written = ingest(str(tmp_path), run, ids, batch_size=2)
    assert done == set(ids[:4]) and written == ids[4:]
    lake = open_lake(tmp_path)
    for name, per in ROWS_PER_SAMPLE.items():
        key = ", ".join(TABLES[name].key)
        dup = lake.sql(f"SELECT count(*) FROM (SELECT {key} FROM {name} GROUP BY ALL HAVING count(*) > 1)")
        assert dup.fetchall() == [(0,)]
        assert lake.arrow(name).num_rows == 7 * per
    row = lake.sql("SELECT status, started_at, finished_at, n_done, n_failed FROM runs").fetchall()[0]
    assert row[0] == "complete" and row[1] == started and row[2] >= started and row[3:] == (7, 0)


def test_failures_are_recorded_and_counted_and_retried_on_resume(tmp_path):
    run = make_run()
    lake = open_lake(tmp_path)
    writer = lake.writer(run)
    writer.begin()
    writer.commit(batch_rows(["s0000"]))
    writer.fail([{"sample_id": "s0001", "stage": "capture", "error": "boom"}])
    writer.finish()
    lake.refresh()
    assert lake.sql("SELECT n_done, n_failed FROM runs").fetchall()[0] == (1, 1)
    assert lake.sql("SELECT stage, error, model FROM failures").fetchall() == [
        ("capture", "boom", "toy-llava")
    ]
    resumed = lake.writer(run)
    assert resumed.begin() == {"s0000"}
    lake.refresh()
    assert lake.arrow("failures").num_rows == 0  # the failed sample is tried again


def test_runs_row_carries_provenance_and_commits_carry_it_in_their_metadata(tmp_path):
    ingest(str(tmp_path), make_run(), sample_ids(2))
    lake = open_lake(tmp_path)
    config, code = lake.sql("SELECT config, code_version FROM runs").fetchall()[0]
    assert json.loads(config) == {"hidden_size": HIDDEN, "seed": 0} and code == "test-1"
    history = lake.delta("hidden").history()
    writes = [h for h in history if h["operation"] == "WRITE"]
    assert writes and all(h["vrp.run_id"] == "run-a" for h in writes)
    assert writes[0]["vrp.code_version"] == "test-1" and writes[0]["vrp.model_revision"] == "rev-1"
    assert json.loads(writes[0]["vrp.vector_widths"]) == {"h": HIDDEN}


def test_commit_requires_begin(tmp_path):
    writer = open_lake(tmp_path).writer(make_run())
    with pytest.raises(LakeError, match="begin"):
        writer.commit(batch_rows(["s0000"]))


def test_a_sharded_writer_must_name_its_samples(tmp_path):
    with pytest.raises(ValueError, match="owned_sample_ids"):
        open_lake(tmp_path).writer(make_run(), shard=(1, 3))


# --------------------------------------------------------------------------- storage
def test_partition_values_stay_inside_the_table_folder_and_round_trip(tmp_path):
    names = ["../../x", "a/b", "x=y", "%2e%2e", "/abs", "sp ace"]
    for i, model in enumerate(names):
        ingest(str(tmp_path), make_run(f"run-{i}", model=model), ["s0000"])
    root = os.path.realpath(tmp_path)
    for folder, _dirs, files in os.walk(root):
        for file in files:
            assert os.path.realpath(os.path.join(folder, file)).startswith(root + os.sep)
    assert not os.path.exists(os.path.join(os.path.dirname(root), "x"))
    lake = open_lake(tmp_path)
    for name in ["samples", "hidden", "layers"]:
        got = {r[0] for r in lake.sql(f"SELECT DISTINCT model FROM {name}").fetchall()}
        assert got == set(names), name
        assert set(lake.table(name).select("model").unique().collect()["model"]) == set(names)
    for model in names:
        hidden = lake.arrow("hidden", filter={"model": model})
        assert hidden.num_rows == ROWS_PER_SAMPLE["hidden"]
        for file in lake.delta("hidden").file_uris():
            assert os.path.realpath(file).startswith(os.path.join(root, "hidden") + os.sep)


def test_float32_vectors_round_trip_bit_exactly_through_duckdb_polars_and_pyarrow(tmp_path):
    rng = np.random.default_rng(7)
    special = np.array(
        [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, np.finfo(np.float32).max, np.finfo(np.float32).min, 1 / 3],
        dtype=np.float32,
    )
    bf16_origin = (rng.standard_normal(HIDDEN * 4).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(
        np.float32
    )
    vectors = [special, bf16_origin[:HIDDEN], bf16_origin[HIDDEN : 2 * HIDDEN], rng.standard_normal(HIDDEN)]
    vectors = [np.asarray(v, dtype=np.float32) for v in vectors]
    run = make_run()
    writer = open_lake(tmp_path).writer(run)
    writer.begin()
    rows = [{"sample_id": f"s{i}", "site": "resid", "layer": 0, "h": v} for i, v in enumerate(vectors)]
    writer.commit({"hidden": rows})
    expected = np.stack(vectors).view(np.uint32)
    lake = open_lake(tmp_path)

    duck = lake.sql("SELECT h FROM hidden ORDER BY sample_id").to_arrow_table()
    polars = lake.table("hidden").sort("sample_id").select("h").collect()
    arrow = lake.arrow("hidden", columns=["sample_id", "h"]).sort_by("sample_id")
    got_duck = np.array(duck.column("h").to_pylist(), dtype=np.float32)
    got_polars = np.stack([np.asarray(v, dtype=np.float32) for v in polars["h"].to_list()])
    got_arrow = to_matrix(arrow.column("h"))
    for got in (got_duck, got_polars, got_arrow):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), expected)
    assert polars.schema["h"] == pl.List(pl.Float32)


def test_every_file_uses_encodings_sparks_vectorized_reader_takes(tmp_path):
    # Spark before 4.3 rejects BYTE_STREAM_SPLIT in its default (vectorized) Parquet reader
    ingest(str(tmp_path), make_run(), sample_ids(3))
    lake = open_lake(tmp_path)
    readable = {"PLAIN", "RLE", "BIT_PACKED", "DELTA_BINARY_PACKED", "RLE_DICTIONARY", "PLAIN_DICTIONARY"}
    for name in ("runs", "samples", "layers", "hidden"):
        for file in lake.delta(name).file_uris():
            meta = pq.ParquetFile(file).metadata
            for i in range(meta.num_columns):
                column = meta.row_group(0).column(i)
                assert set(column.encodings) <= readable, (name, column.path_in_schema, column.encodings)
                assert column.compression == "ZSTD"
                assert not column.has_dictionary_page, (name, column.path_in_schema)
    vec = pq.ParquetFile(lake.delta("hidden").file_uris()[0]).metadata.row_group(0)
    vec = {vec.column(i).path_in_schema: vec.column(i) for i in range(vec.num_columns)}["h.list.element"]
    assert vec.physical_type == "FLOAT" and "PLAIN" in vec.encodings


def test_write_table_replaces_one_runs_rows(tmp_path):
    lake = open_lake(tmp_path)
    rows = [
        {"run_id": r, "model": "m", "site": "resid", "layer": layer, "probe": "logreg", "auroc": auroc}
        for r, auroc in (("r1", 0.6), ("r2", 0.7))
        for layer in range(3)
    ]
    lake.write_table("probe_layers", rows)
    again = [dict(r, auroc=0.9) for r in rows if r["run_id"] == "r1"][:2]
    lake.write_table("probe_layers", again, replace_where={"run_id": "r1"})
    got = lake.sql(
        "SELECT run_id, count(*), avg(auroc) FROM probe_layers GROUP BY run_id ORDER BY 1"
    ).fetchall()
    assert [(r, n) for r, n, _ in got] == [("r1", 2), ("r2", 3)]
    assert got[0][2] == pytest.approx(0.9) and got[1][2] == pytest.approx(0.7)
    with pytest.raises(LakeValidationError):
        lake.write_table("probe_layers", rows, replace_where={"run_id": "r1"})
    with pytest.raises(LakeValidationError, match="auroc"):
        lake.write_table("probe_layers", [dict(rows[0], auroc=float("nan"))])


def test_reader_is_pinned_to_the_snapshot_it_opened(tmp_path):
    run = make_run()
    ingest(str(tmp_path), run, sample_ids(2))
    lake = open_lake(tmp_path)
    assert lake.sql("SELECT count(*) FROM samples").fetchall()[0] == (2,)
    ingest(str(tmp_path), run, sample_ids(4))
    assert lake.sql("SELECT count(*) FROM samples").fetchall()[0] == (2,)
    lake.refresh()
    assert lake.sql("SELECT count(*) FROM samples").fetchall()[0] == (4,)


def test_an_empty_lake_reads_as_empty_tables(tmp_path):
    lake = open_lake(tmp_path / "none")
    assert lake.versions() == {}
    assert lake.sql("SELECT count(*) FROM samples").fetchall()[0] == (0,)
    assert lake.table("hidden").collect().height == 0
    assert lake.arrow("layers").schema.names == TABLES["layers"].schema.names
