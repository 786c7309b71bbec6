"""Turn caller rows into an Arrow table of a lake schema, rejecting anything the lake must not hold.

Everything here runs before the first byte is written, so a rejected batch leaves the lake
exactly as it was. Checks: unknown columns, values that do not convert to the column type,
nulls in key/partition columns, NaN or +-inf in any float column or vector element (DuckDB
would silently propagate them into every aggregate), vectors of the wrong width, and duplicate
keys inside the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vrp.lake.errors import LakeValidationError
from vrp.schema import TableSpec, parse_width_rule

Rows = pa.Table | Sequence[Mapping[str, Any]]


def _sample_at(table: pa.Table | None, rows: Sequence[Mapping[str, Any]] | None, index: int) -> str | None:
    """The sample id of row `index` (for error messages), or None when the table has none."""
    if rows is not None:
        value = rows[index].get("sample_id")
        return None if value is None else str(value)
    if table is not None and "sample_id" in table.column_names:
        value = table.column("sample_id")[index].as_py()
        return None if value is None else str(value)
    return None


def _vector_array(values: list[Any], field: pa.Field) -> pa.Array:
    """Build a float32 list array; a fast path concatenates numpy rows instead of boxing each float."""
    if values and all(isinstance(v, np.ndarray) and v.ndim == 1 for v in values):
        lengths = np.fromiter((v.shape[0] for v in values), dtype=np.int64, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate([v.astype(np.float32, copy=False) for v in values]) if values else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()), type=field.type)
    return pa.array(
        [np.asarray(v, dtype=np.float32) if isinstance(v, np.ndarray) else v for v in values], type=field.type
    )


def _column_from_values(
    spec: TableSpec, field: pa.Field, values: list[Any], rows: Sequence[Mapping]
) -> pa.Array:
    try:
        if field.name in spec.vectors:
            return _vector_array(values, field)
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        for i, value in enumerate(values):  # locate the offending row for the message
            try:
                pa.array([value], type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                raise LakeValidationError(
                    spec.name,
                    field.name,
                    _sample_at(None, rows, i),
                    f"value {value!r:.60} is not {field.type}",
                ) from exc
        raise LakeValidationError(
            spec.name, field.name, None, f"cannot convert to {field.type}: {exc}"
        ) from exc


def to_arrow(spec: TableSpec, rows: Rows, fill: Mapping[str, Any] | None = None) -> pa.Table:
    """Rows (Arrow table or list of dicts) as an Arrow table with exactly `spec.schema`.

    Columns absent from the rows are taken from `fill` (e.g. the run's ``run_id`` and ``model``)
    when given there, else null. Unknown columns are an error: the lake renames nothing silently.
    """
    fill = dict(fill or {})
    names = set(spec.schema.names)
    if isinstance(rows, pa.Table):
        unknown = [c for c in rows.column_names if c not in names]
        if unknown:
            raise LakeValidationError(
                spec.name, unknown[0], None, f"unknown column (the {spec.name} schema has no {unknown[0]!r})"
            )
        arrays = []
        for field in spec.schema:
            if field.name in rows.column_names:
                column = rows.column(field.name)
                try:
                    arrays.append(column.cast(field.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise LakeValidationError(
                        spec.name, field.name, None, f"cannot cast {column.type} to {field.type}"
                    ) from exc
            else:
                value = fill.get(field.name)
                arrays.append(pa.array([value] * rows.num_rows, type=field.type))
        return pa.Table.from_arrays(arrays, schema=spec.schema.remove_metadata())
    rows = list(rows)
    for i, row in enumerate(rows):
        unknown = [c for c in row if c not in names]
        if unknown:
            raise LakeValidationError(
                spec.name,
                unknown[0],
                _sample_at(None, rows, i),
                f"unknown column (the {spec.name} schema has no {unknown[0]!r})",
            )
    arrays = []
    for field in spec.schema:
        default = fill.get(field.name)
        values = [row.get(field.name, default) for row in rows]
        arrays.append(_column_from_values(spec, field, values, rows))
    return pa.Table.from_arrays(arrays, schema=spec.schema.remove_metadata())


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first true value of a boolean array (nulls count as false)."""
    values = pc.fill_null(mask, False)
    if not pc.any(values).as_py():
        return None
    return int(pc.index(values, True).as_py())


def expected_widths(
    spec: TableSpec, table: pa.Table, run_config: Mapping[str, Any] | None
) -> dict[str, pa.Array]:
    """Per vector column, the expected width of every row (from the run config or the row itself)."""
    out: dict[str, pa.Array] = {}
    for column, rule in spec.vectors.items():
        source, names = parse_width_rule(rule)
        if source == "run":
            key = names[0]
            value = (run_config or {}).get(key)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
                raise LakeValidationError(
                    spec.name,
                    column,
                    None,
                    f"the run's config must give a positive integer {key!r} "
                    f"(the width of {column}); got {value!r}",
                )
            out[column] = pa.array(np.full(table.num_rows, int(value), dtype=np.int64))
        else:
            width = pa.array(np.ones(table.num_rows, dtype=np.int64))
            for name in names:
                width = pc.multiply(width, pc.cast(table.column(name), pa.int64()))
            out[column] = width.combine_chunks() if isinstance(width, pa.ChunkedArray) else width
    return out


def validate(spec: TableSpec, table: pa.Table, run_config: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Raise LakeValidationError for the first problem in `table`; return the vector widths seen.

    The returned mapping (vector column -> width, when all rows share one) is recorded in the
    commit metadata as provenance.
    """
    for name in spec.required:
        bad = _first_true(pc.is_null(table.column(name)))
        if bad is not None:
            raise LakeValidationError(
                spec.name, name, _sample_at(table, None, bad), "missing value (this column is required)"
            )
    for name in spec.float_columns:
        column = table.column(name)
        bad = _first_true(pc.invert(pc.is_finite(column)))
        if bad is not None:
            value = column[bad].as_py()
            raise LakeValidationError(
                spec.name, name, _sample_at(table, None, bad), f"non-finite value {value}"
            )
    widths_seen: dict[str, int] = {}
    expected = expected_widths(spec, table, run_config) if table.num_rows else {}
    for name in spec.vectors:
        column = table.column(name).combine_chunks()
        if table.num_rows == 0:
            continue
        flat = pc.list_flatten(column)
        parents = pc.list_parent_indices(column)
        bad_items = pc.or_kleene(pc.is_null(flat), pc.invert(pc.is_finite(flat)))
        bad = _first_true(bad_items)
        if bad is not None:
            row = int(parents[bad].as_py())
            value = flat[bad].as_py()
            raise LakeValidationError(
                spec.name,
                name,
                _sample_at(table, None, row),
                f"element {bad - int(column.offsets[row].as_py())} is {value}",
            )
        lengths = pc.cast(pc.list_value_length(column), pa.int64())
        wrong = _first_true(pc.not_equal(lengths, expected[name]))
        if wrong is not None:
            raise LakeValidationError(
                spec.name,
                name,
                _sample_at(table, None, wrong),
                f"vector of width {lengths[wrong].as_py()}, "
                f"expected {expected[name][wrong].as_py()} ({spec.vectors[name]})",
            )
        distinct = pc.unique(lengths)
        if len(distinct) == 1:
            widths_seen[name] = int(distinct[0].as_py())
    _check_duplicate_keys(spec, table)
    return widths_seen


def _check_duplicate_keys(spec: TableSpec, table: pa.Table) -> None:
    if table.num_rows < 2:
        return
    keys = table.select(list(spec.key))
    mask = None
    for name in spec.key:
        valid = pc.is_valid(keys.column(name))
        mask = valid if mask is None else pc.and_(mask, valid)
    keys = keys.filter(mask)
    counts = keys.group_by(list(spec.key)).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dup.num_rows:
        first = dup.slice(0, 1).to_pylist()[0]
        first.pop("count_all")
        raise LakeValidationError(
            spec.name, None, first.get("sample_id"), f"duplicate key {first} in one batch (key {spec.key})"
        )
