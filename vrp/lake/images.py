"""The ``images`` table: each picture once, as the model saw it, keyed by its content hash.

Usage::

    row = image_row(view)                 # view: [H, W, 3] uint8 after the processor's resize/crop
    store_images(lake_root, [row, ...])   # inserts only hashes the lake does not hold yet
    picture = load_images(lake, [row["image_hash"]])[row["image_hash"]]

The pixels are stored losslessly (PNG) after the processor's resize and crop, so a map on the
patch grid lines up with them cell for cell. ``image_hash`` hashes the pixels and their shape,
so two questions about one image, or two models whose processors produce the same picture,
share one row; ``samples.image_hash`` points at it. The table is not part of any run (it has no
``run_id``): rows are inserted with a MERGE on the hash, so concurrent writers never store an
image twice and a resumed run never duplicates one.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import write_deltalake
from PIL import Image

from vrp.lake import delta
from vrp.lake.validate import to_arrow, validate
from vrp.schema import TABLES

if TYPE_CHECKING:
    from vrp.lake.lake import Lake

MEDIA_TYPE = "image/png"


def image_hash(view: np.ndarray) -> str:
    """Hex SHA-256 of an [H, W, 3] uint8 picture's shape and pixels (not of any file encoding)."""
    pixels = np.ascontiguousarray(view, dtype=np.uint8)
    height, width, channels = pixels.shape
    digest = hashlib.sha256(f"{height}x{width}x{channels}:".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def image_row(view: np.ndarray) -> dict[str, Any]:
    """One ``images`` row: the picture as PNG bytes with its hash and size."""
    pixels = np.ascontiguousarray(view, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"an image view must be [H, W, 3] uint8, got shape {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=6)
    return {
        "image_hash": image_hash(pixels),
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "media_type": MEDIA_TYPE,
        "data": buffer.getvalue(),
    }


def store_images(root: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert the rows whose hash the lake does not hold yet; returns how many were inserted."""
    unique: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        unique.setdefault(str(row["image_hash"]), row)
    if not unique:
        return 0
    spec = TABLES["images"]
    dt = delta.ensure_table(root, spec)

    def action() -> int:
        # A plain append of the hashes not held yet, re-read after every lost race: Delta's MERGE
        # would store the strings as Arrow string_view, which Daft and older pyarrow cannot read
        # (docs/ARCHITECTURE.md, reading rules). Two writers racing on the same new picture can
        # both append it: the rows are identical, and `vrp lake check` lists the pair.
        dt.update_incremental()
        held = set(dt.to_pyarrow_dataset().to_table(columns=["image_hash"]).column("image_hash").to_pylist())
        fresh = [row for key, row in unique.items() if key not in held]
        if not fresh:
            return 0
        source = to_arrow(spec, fresh)
        validate(spec, source)
        write_deltalake(dt, source, mode="append", writer_properties=delta.writer_properties(spec))
        return len(fresh)

    return delta.retry_commit(action)


def load_images(lake: Lake, hashes: Sequence[str]) -> dict[str, bytes]:
    """image_hash -> PNG bytes for the hashes the lake holds (absent ones are simply missing)."""
    wanted = sorted({h for h in hashes if h})
    if not wanted or not lake.has_table("images"):
        return {}
    # filtered batch by batch in memory: a pushed-down IN filter on this unpartitioned table trips
    # over the Delta statistics' string_view type (pyarrow 2x), and the table is small anyway
    value_set = pa.array(wanted, type=pa.string())
    out: dict[str, bytes] = {}
    for batch in lake.dataset("images").to_batches(columns=["image_hash", "data"]):
        hashes = batch.column("image_hash").cast(pa.string())
        chosen = batch.filter(pc.is_in(hashes, value_set=value_set))
        out.update(
            zip(chosen.column("image_hash").to_pylist(), chosen.column("data").to_pylist(), strict=True)
        )
    return out


def decode(data: bytes) -> np.ndarray:
    """PNG bytes -> [H, W, 3] uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


__all__ = ["MEDIA_TYPE", "decode", "image_hash", "image_row", "load_images", "store_images"]
