"""Arrow schemas of the activation lake: one :class:`TableSpec` per Delta table.

This module is the single source of truth for what the lake stores (docs/ARCHITECTURE.md section 6). The
writer validates every batch against these specs before it touches disk, and the reader uses
them to present empty tables for a fresh lake, so both sides agree on column names and types.

Vectors (``hidden.h``, ``attention_maps.map``, ``evidence_maps.map``) are float32 lists. Delta
normalises Arrow fixed-size lists to variable lists, so the fixed width is enforced by the writer
instead and described by :attr:`TableSpec.vectors`:

* ``"run:<config key>"``: the width is ``run["config"][<config key>]`` (``hidden`` takes
  ``hidden_size``). Several models with different hidden sizes share the table, partitioned by
  ``model``; a model keeps one width across runs (checked against the ``runs`` table).
* ``"row:<col>*<col>"``: the width is the product of that row's columns (``attention_maps``
  takes ``grid_h*grid_w``, which varies per sample for Qwen2-VL).

The rule is also stored in the vector field's Arrow metadata (key ``vrp.width``) so it travels
with the Delta schema, and each commit records the widths it wrote in its commit metadata.

``evidence_maps`` is the logit lens on the patch grid (per stored layer, the truth token's logit
minus the mean logit at each image position); ``images`` holds each picture once as the model saw
it (PNG, keyed by a hash of its pixels), shared by every run and pointed at by
``samples.image_hash``, so it is the one table without ``run_id``.

Bump :data:`SCHEMA_VERSION` whenever the tables change; the lake refuses to open tables of
another version (see ``vrp.lake``). A new column is nullable and goes at the *end* of its
table's field list: ``vrp lake migrate`` (``vrp.lake.migrate``) then upgrades an older lake in
place by appending the missing columns (null in existing rows), creating missing tables and
bumping the version property, with no per-version code. Renaming, removing or retyping a column
cannot be migrated that way and needs a new lake.

Version 2 is one upgrade for everything the open-ended answers, the image conditions, the new
intervention kinds and the pictures needed (no lake was ever shared between them): the columns
of open-ended answers, ``samples.task``, ``answers`` (the human answers), ``score``,
``question_type``, ``answer_type``, ``source`` and the truth token's ``truth_prob``/
``truth_margin``/``truth_rank`` (the yes/no columns stay null for open answers);
``samples.first_token_kl`` (condition runs); ``samples.image_hash`` and the tables
``evidence_maps`` and ``images`` (the pictures); ``layers.lens_truth_rank``;
``generations.score``; ``interventions.score``/``truth_prob``/``truth_margin`` and the patching
columns; the multi-grid columns ``tile`` (``attention_maps``, ``evidence_maps``, where it joins the
key), ``attention_maps.mass``/``spatial_entropy``/``spatial_entropy_norm``/``cluster_count`` and
``samples.n_grids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION: int = 2

#: Arrow metadata key on a vector field holding its width rule.
WIDTH_METADATA_KEY = b"vrp.width"

#: Delta table property recording the schema version a table was created with.
SCHEMA_VERSION_PROPERTY = "vrp.schema_version"

#: ``runs.kind`` of a contrastive image-condition run (vrp.ingest.conditions): a capture run whose
#: rows go to ``samples`` like an image run's, with ``base_run_id`` naming the image run. Any other
#: non-null kind is an intervention, whose rows go to ``interventions``.
CONDITION_KINDS: frozenset[str] = frozenset({"none", "blank", "noise", "mismatch"})

_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    """One lake table: its Arrow schema, Delta partition columns, row key and vector widths."""

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    key: tuple[str, ...]
    vectors: dict[str, str]

    @property
    def float_columns(self) -> tuple[str, ...]:
        """Scalar floating-point columns (checked for NaN/inf before any write)."""
        return tuple(f.name for f in self.schema if pa.types.is_floating(f.type))

    @property
    def required(self) -> tuple[str, ...]:
        """Columns that may never be null: the non-nullable fields (keys and partitions)."""
        return tuple(f.name for f in self.schema if not f.nullable)


def vector_type() -> pa.DataType:
    """The storage type of every vector: a float32 list whose item is named as Delta names it."""
    return pa.list_(pa.field("element", pa.float32(), nullable=True))


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


def _vec(name: str, rule: str) -> pa.Field:
    return pa.field(name, vector_type(), nullable=False, metadata={WIDTH_METADATA_KEY: rule.encode()})


def _strings() -> pa.DataType:
    """A list of strings, its item named as Delta names it (so the stored schema reads back equal)."""
    return pa.list_(pa.field("element", pa.string(), nullable=True))


def _f64(*names: str) -> list[pa.Field]:
    return [_opt(n, pa.float64()) for n in names]


def _spec(
    name: str,
    fields: list[pa.Field],
    partition_by: tuple[str, ...],
    key: tuple[str, ...],
    vectors: dict[str, str] | None = None,
) -> TableSpec:
    schema = pa.schema(
        fields, metadata={b"vrp.table": name.encode(), b"vrp.schema_version": b"%d" % SCHEMA_VERSION}
    )
    names = set(schema.names)
    nested = [f.name for f in fields if pa.types.is_list(f.type) and f.name not in (vectors or {})]
    if nested and vectors:  # the writer's encodings (vrp.lake.delta.writer_properties) need this
        raise AssertionError(f"table {name}: a table with vectors cannot hold other lists {nested}")
    missing = (set(partition_by) | set(key) | set(vectors or {})) - names
    if missing:
        raise AssertionError(f"table {name}: spec names unknown columns {sorted(missing)}")
    return TableSpec(name, schema, partition_by, key, dict(vectors or {}))


_ID = [_req("run_id", pa.string()), _req("sample_id", pa.string()), _req("model", pa.string())]
_ANSWER = [
    _opt("answer_text", pa.string()),
    _opt("answer", pa.string()),
    _opt("parse_status", pa.string()),
    _opt("correct", pa.bool_()),
]

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in [
        _spec(
            "runs",
            [
                _req("run_id", pa.string()),
                _req("model", pa.string()),
                _opt("model_source", pa.string()),
                _opt("model_revision", pa.string()),
                _opt("family", pa.string()),
                _opt("dataset", pa.string()),
                _opt("split", pa.string()),
                _opt("dtype", pa.string()),
                _opt("device", pa.string()),
                _opt("attention_backend", pa.string()),
                _opt("code_version", pa.string()),
                _opt("config", pa.string()),
                _opt("base_run_id", pa.string()),
                _opt("kind", pa.string()),
                _opt("schema_version", pa.int32()),
                _opt("started_at", _TS),
                _opt("finished_at", _TS),
                _opt("status", pa.string()),
                _opt("n_done", pa.int64()),
                _opt("n_failed", pa.int64()),
            ],
            (),
            ("run_id",),
        ),
        _spec(
            "samples",
            [
                *_ID,
                _req("dataset", pa.string()),
                _opt("split", pa.string()),
                _opt("question_id", pa.string()),
                _opt("image_id", pa.string()),
                _opt("question", pa.string()),
                _opt("object", pa.string()),
                _opt("category", pa.string()),
                _opt("label", pa.string()),
                *_ANSWER,
                *_f64("p_yes", "p_no", "yes_no_margin", "top1_prob", "top2_margin", "token_entropy"),
                *_f64("answer_logprob", "sc_agreement"),
                _opt("sc_answer", pa.string()),
                _opt("sc_k", pa.int32()),
                _opt("n_image_tokens", pa.int32()),
                _opt("grid_h", pa.int32()),
                _opt("grid_w", pa.int32()),
                _opt("image_h", pa.int32()),
                _opt("image_w", pa.int32()),
                *_f64("spatial_entropy", "spatial_entropy_norm"),
                _opt("cluster_count", pa.int32()),
                # schema version 2: open-ended answers (docs/ARCHITECTURE.md section 6)
                _opt("task", pa.string()),
                _opt("answers", _strings()),
                _opt("score", pa.float64()),
                _opt("question_type", pa.string()),
                _opt("answer_type", pa.string()),
                _opt("source", pa.string()),
                *_f64("truth_prob", "truth_margin"),
                _opt("truth_rank", pa.int32()),
                # condition runs only: KL(image run's first-token distribution || this run's), nats
                _opt("first_token_kl", pa.float64()),
                # schema version 2: the `images` row of the picture this model saw (null before it)
                _opt("image_hash", pa.string()),
                # schema version 2: how many patch grids the model saw the image as (global view + tiles)
                _opt("n_grids", pa.int32()),
            ],
            ("model", "dataset"),
            ("run_id", "sample_id"),
        ),
        _spec(
            "failures",
            [
                _req("run_id", pa.string()),
                # null when the sample could not be identified (e.g. its image failed to load)
                _opt("sample_id", pa.string()),
                _req("model", pa.string()),
                _opt("dataset", pa.string()),
                _opt("split", pa.string()),
                _opt("question_id", pa.string()),
                _req("stage", pa.string()),
                _opt("error", pa.string()),
                _opt("failed_at", _TS),
            ],
            ("model",),
            ("run_id", "sample_id"),
        ),
        _spec(
            "layers",
            [
                *_ID,
                _req("layer", pa.int32()),
                *_f64("image_mass", "spatial_entropy", "spatial_entropy_norm"),
                _opt("cluster_count", pa.int32()),
                *_f64("lens_yes_no_margin", "lens_truth_margin"),
                _opt("lens_answer_rank", pa.int32()),
                *_f64("lens_entropy", "attn_contrib", "mlp_contrib"),
                _opt("lens_truth_rank", pa.int32()),  # schema version 2
            ],
            ("model",),
            ("run_id", "sample_id", "layer"),
        ),
        _spec(
            "heads",
            [
                *_ID,
                _req("layer", pa.int32()),
                _req("head", pa.int32()),
                *_f64("image_mass", "spatial_entropy", "spatial_entropy_norm"),
            ],
            ("model",),
            ("run_id", "sample_id", "layer", "head"),
        ),
        _spec(
            "attention_maps",
            [
                *_ID,
                _req("layer", pa.int32()),
                _req("grid_h", pa.int32()),
                _req("grid_w", pa.int32()),
                _vec("map", "row:grid_h*grid_w"),
                # schema version 2, several grids per image (docs/ARCHITECTURE.md section 4.1b): -1 (or
                # null in older rows) is the map over the whole image, 0.. each grid, global view first
                _opt("tile", pa.int32()),
                # the grid's raw head-mean attention mass (as layers.image_mass) and this map's H_s, C_k
                *_f64("mass", "spatial_entropy", "spatial_entropy_norm"),
                _opt("cluster_count", pa.int32()),
            ],
            ("model",),
            ("run_id", "sample_id", "layer", "tile"),
            {"map": "row:grid_h*grid_w"},
        ),
        _spec(
            "evidence_maps",
            [
                *_ID,
                _req("layer", pa.int32()),
                _req("grid_h", pa.int32()),
                _req("grid_w", pa.int32()),
                _vec("map", "row:grid_h*grid_w"),
                _opt("tile", pa.int32()),  # as attention_maps.tile
            ],
            ("model",),
            ("run_id", "sample_id", "layer", "tile"),
            {"map": "row:grid_h*grid_w"},
        ),
        _spec(
            "images",
            [
                _req("image_hash", pa.string()),
                _req("height", pa.int32()),
                _req("width", pa.int32()),
                _req("media_type", pa.string()),
                _req("data", pa.binary()),
            ],
            (),
            ("image_hash",),
        ),
        _spec(
            "hidden",
            [*_ID, _req("site", pa.string()), _req("layer", pa.int32()), _vec("h", "run:hidden_size")],
            ("model", "site", "layer"),
            ("run_id", "sample_id", "site", "layer"),
            {"h": "run:hidden_size"},
        ),
        _spec(
            "generations",
            [
                *_ID,
                _req("k", pa.int32()),
                _opt("text", pa.string()),
                _opt("answer", pa.string()),
                _opt("parse_status", pa.string()),
                _opt("correct", pa.bool_()),
                _opt("seed", pa.int64()),
                *_f64("temperature", "top_p"),
                _opt("score", pa.float64()),  # schema version 2
            ],
            ("model",),
            ("run_id", "sample_id", "k"),
        ),
        _spec(
            "probe_layers",
            [
                _req("run_id", pa.string()),
                _req("model", pa.string()),
                _req("site", pa.string()),
                _req("layer", pa.int32()),
                _req("probe", pa.string()),
                *_f64("auroc", "auroc_low", "auroc_high", "accuracy"),
                _opt("n", pa.int64()),
                _opt("n_pos", pa.int64()),
                _opt("folds", pa.int32()),
                _opt("seed", pa.int64()),
            ],
            ("model",),
            ("run_id", "site", "layer", "probe"),
        ),
        _spec(
            "probe_neurons",
            [
                _req("run_id", pa.string()),
                _req("model", pa.string()),
                _req("site", pa.string()),
                _req("layer", pa.int32()),
                _req("method", pa.string()),
                _req("neuron", pa.int32()),
                _opt("coef", pa.float64()),
                _opt("rank", pa.int32()),
            ],
            ("model",),
            ("run_id", "site", "layer", "method", "neuron"),
        ),
        _spec(
            "interventions",
            [
                *_ID,
                _req("kind", pa.string()),
                _req("condition", pa.string()),
                _req("level", pa.float64()),
                _opt("base_run_id", pa.string()),
                _opt("setting", pa.string()),
                _opt("detail", pa.string()),
                *_ANSWER,
                *_f64("yes_no_margin", "p_yes", "p_no"),
                _opt("seed", pa.int64()),
                *_f64("score", "truth_prob", "truth_margin"),  # schema version 2
                # the first token's entropy: with truth_margin, the masking detector (high minus full)
                *_f64("token_entropy"),
                # patch: whose activations were written in, and the share of the truth-margin gap closed
                _opt("donor_sample_id", pa.string()),
                *_f64("restoration"),
            ],
            ("model", "kind"),
            ("run_id", "sample_id", "condition", "level"),
        ),
    ]
}


def parse_width_rule(rule: str) -> tuple[str, tuple[str, ...]]:
    """Split a width rule into its source and names: ``"run:hidden_size"`` -> ``("run", ("hidden_size",))``.

    ``row`` rules name row columns multiplied together (``"row:grid_h*grid_w"``).
    """
    source, _, expr = rule.partition(":")
    names = tuple(part.strip() for part in expr.split("*") if part.strip())
    if source not in ("run", "row") or not names or (source == "run" and len(names) != 1):
        raise ValueError(f"bad vector width rule {rule!r}: expected 'run:<config key>' or 'row:<col>*<col>'")
    return source, names
