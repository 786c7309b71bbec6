"""The lake's table specs match the lake contract (DESIGN.md section 6) and version checks bite."""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from vrp.lake import LakeSchemaVersionError, open_lake
from vrp.schema import SCHEMA_VERSION, SCHEMA_VERSION_PROPERTY, TABLES, WIDTH_METADATA_KEY, parse_width_rule

# The contract's minimum columns, partitions and keys, copied from DESIGN.md section 6 by hand.
CONTRACT = {
    "runs": (
        (),
        ("run_id",),
        "model model_source model_revision family dataset split dtype device "
        "attention_backend code_version config started_at finished_at status n_done n_failed",
    ),
    "samples": (
        ("model", "dataset"),
        ("run_id", "sample_id"),
        "split image_id question object label answer_text answer parse_status correct p_yes p_no "
        "yes_no_margin top1_prob top2_margin token_entropy answer_logprob sc_agreement sc_answer "
        "n_image_tokens grid_h grid_w spatial_entropy cluster_count",
    ),
    "failures": (("model",), ("run_id", "sample_id"), "stage error"),
    "layers": (
        ("model",),
        ("run_id", "sample_id", "layer"),
        "image_mass spatial_entropy cluster_count lens_yes_no_margin lens_truth_margin "
        "lens_answer_rank lens_entropy attn_contrib mlp_contrib",
    ),
    "heads": (("model",), ("run_id", "sample_id", "layer", "head"), "image_mass spatial_entropy"),
    "attention_maps": (
        ("model",),
        ("run_id", "sample_id", "layer", "tile"),
        "grid_h grid_w map tile mass spatial_entropy cluster_count",
    ),
    "evidence_maps": (("model",), ("run_id", "sample_id", "layer", "tile"), "grid_h grid_w map tile"),
    "images": ((), ("image_hash",), "height width media_type data"),
    "hidden": (("model", "site", "layer"), ("run_id", "sample_id", "site", "layer"), "site h"),
    "generations": (("model",), ("run_id", "sample_id", "k"), "text answer correct seed"),
    "probe_layers": (
        ("model",),
        ("run_id", "site", "layer", "probe"),
        "probe auroc auroc_low auroc_high n folds",
    ),
    "probe_neurons": (("model",), ("run_id", "site", "layer", "method", "neuron"), "method coef rank"),
    "interventions": (
        ("model", "kind"),
        ("run_id", "sample_id", "condition", "level"),
        "level base_run_id kind condition setting detail answer correct yes_no_margin p_yes",
    ),
}


def test_every_contract_table_has_its_columns_partitions_and_key():
    assert set(TABLES) == set(CONTRACT)
    for name, (partitions, key, columns) in CONTRACT.items():
        spec = TABLES[name]
        assert spec.name == name
        assert spec.partition_by == partitions, name
        assert spec.key == key, name
        names = set(spec.schema.names)
        per_run = set() if name == "images" else {"run_id", "model"}  # images are shared by runs
        missing = (per_run | set(columns.split()) | set(key) | set(partitions)) - names
        assert not missing, f"{name} lacks {missing}"
        for column in set(key) | set(partitions):
            # a load failure may have no sample id yet; a map row from before the multi-grid columns
            # (a migrated lake) has no tile, and reads as the whole-image map
            if (name, column) not in {
                ("failures", "sample_id"),
                ("attention_maps", "tile"),
                ("evidence_maps", "tile"),
            }:
                assert not spec.schema.field(column).nullable, (name, column)


def test_vectors_are_float32_lists_with_their_width_rule_in_field_metadata():
    assert TABLES["hidden"].vectors == {"h": "run:hidden_size"}
    assert TABLES["attention_maps"].vectors == {"map": "row:grid_h*grid_w"}
    for spec in TABLES.values():
        for column, rule in spec.vectors.items():
            field = spec.schema.field(column)
            assert pa.types.is_list(field.type) and field.type.value_type == pa.float32()
            assert field.metadata[WIDTH_METADATA_KEY].decode() == rule
    assert parse_width_rule("row:grid_h*grid_w") == ("row", ("grid_h", "grid_w"))
    assert parse_width_rule("run:hidden_size") == ("run", ("hidden_size",))
    with pytest.raises(ValueError):
        parse_width_rule("hidden_size")


def test_scalar_float_columns_are_float64_and_ids_strings():
    for spec in TABLES.values():
        for field in spec.schema:
            if pa.types.is_floating(field.type):
                assert field.type == pa.float64(), (spec.name, field.name)
        key = "image_hash" if spec.name == "images" else "run_id"
        assert spec.schema.field(key).type == pa.string()


def _table_with_version(root, name: str, version: str) -> None:
    spec = TABLES[name]
    DeltaTable.create(
        f"{root}/{name}",
        spec.schema,
        partition_by=list(spec.partition_by) or None,
        configuration={SCHEMA_VERSION_PROPERTY: version},
        raise_if_key_not_exists=False,
    )


def test_opening_a_lake_of_another_schema_version_names_both_versions_and_what_to_do(tmp_path):
    other = str(SCHEMA_VERSION + 1)
    _table_with_version(tmp_path, "layers", other)
    with pytest.raises(LakeSchemaVersionError) as info:
        open_lake(tmp_path)
    message = str(info.value)
    assert f"schema version {other}" in message
    assert f"schema version {SCHEMA_VERSION}" in message
    assert "new lake" in message and "layers" in message


def test_same_version_opens(tmp_path):
    _table_with_version(tmp_path, "layers", str(SCHEMA_VERSION))
    lake = open_lake(tmp_path)
    assert lake.has_table("layers") and not lake.has_table("hidden")
    assert lake.versions() == {"layers": 0}
