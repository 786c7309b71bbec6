"""A fresh lake, straight after ingest, read by a second engine (Daft from PyPI) table by table.

Daft reads the Parquet files itself (not through deltalake's Arrow dataset), so it fails on what
other engines fail on: ``string_view`` columns written by a Delta MERGE used to be one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lake_util import two_model_lake

from vrp.lake import open_lake
from vrp.lake.delta import table_path
from vrp.lake.images import image_row, store_images
from vrp.schema import TABLES

daft = pytest.importorskip(
    "daft", reason="`make venv` installs Daft: pip install --no-deps 'daft>=0.7.26,<0.8' (see the Makefile)"
)


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory) -> str:
    root = two_model_lake(str(tmp_path_factory.mktemp("lake")), 5, 3)
    # the pictures table is written by its own insert-if-absent path, twice so it has two files
    store_images(root, [image_row(np.zeros((8, 8, 3), np.uint8))])
    store_images(
        root, [image_row(np.full((8, 8, 3), 200, np.uint8)), image_row(np.zeros((8, 8, 3), np.uint8))]
    )
    return root


def test_no_file_of_a_fresh_lake_stores_arrow_view_types(lake_root):
    lake = open_lake(lake_root)
    seen = 0
    for name in TABLES:
        dt = lake.delta(name)
        if dt is None:
            continue
        for uri in dt.file_uris():
            schema = pq.read_schema(uri)
            for field in schema:
                assert not pa.types.is_string_view(field.type), (name, field)
                assert not pa.types.is_binary_view(field.type), (name, field)
            seen += 1
    assert seen and lake.delta("runs").file_uris() and len(lake.delta("images").file_uris()) == 2


def test_daft_reads_every_table_with_the_same_rows_and_vectors(lake_root):
    lake = open_lake(lake_root)
    for name in TABLES:
        if lake.delta(name) is None:
            continue
        frame = daft.read_deltalake(table_path(lake_root, name))
        assert frame.count_rows() == lake.dataset(name).count_rows(), name
    runs = daft.read_deltalake(table_path(lake_root, "runs")).to_arrow()
    assert sorted(runs.column("run_id").to_pylist()) == ["run-a", "run-b"]
    assert set(runs.column("status").to_pylist()) == {"complete"}

    key = ["run_id", "sample_id", "site", "layer"]
    theirs = (
        daft.read_deltalake(table_path(lake_root, "hidden"))
        .to_arrow()
        .sort_by([(k, "ascending") for k in key])
    )
    ours = lake.arrow("hidden").sort_by([(k, "ascending") for k in key])
    assert theirs.num_rows == ours.num_rows > 0
    for k in key:
        assert theirs.column(k).to_pylist() == ours.column(k).to_pylist()
    np.testing.assert_array_equal(
        np.array(theirs.column("h").to_pylist(), dtype=np.float32),
        np.array(ours.column("h").to_pylist(), dtype=np.float32),
    )
