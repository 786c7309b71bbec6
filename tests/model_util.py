"""Helpers for tests that run tiny models.

- ``local_patches(adapter)`` zeroes the output projections of the vision tower's attention and of
  the first decoder layer's attention, so a patch's change stays in its own image token(s): where
  it lands then says whether an adapter's grid is right.
- ``random_image``, ``changed_pixels``: what patch masking changed in ``pixel_values``.
- ``ingest_multi_grid``: ``vrp ingest run`` on a tiny multi-grid checkpoint and its lake rows.
- ``tiny_checkpoint``, ``photo``, ``meta_wrap``, ``assert_meta_modules``, ``assert_strategy_refused``,
  ``assert_legacy_chat_template_read``, ``bright_block_change``, ``assert_grid_and_stitched_maps``: the
  fixtures and checks every family test module repeats.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image


def photo(width: int, height: int) -> Image.Image:
    """A flat-coloured picture: its size alone drives an adapter's geometry."""
    return Image.new("RGB", (width, height), (90, 120, 150))


def tiny_checkpoint(tmp_path_factory: Any, family: str) -> tuple[Path, Any]:
    """A seeded 2-layer random-init checkpoint of ``family`` and its loaded adapter (one thread)."""
    from vrp.ingest.models import load_adapter
    from vrp.ingest.models.tiny import build_tiny

    torch.manual_seed(0)
    torch.set_num_threads(1)
    path = build_tiny(family, tmp_path_factory.mktemp(family), seed=0, num_layers=2)
    return path, load_adapter(str(path))


def meta_wrap(adapter_cls: Any, model: Any, processor: Any, **settings: Any) -> Any:
    """An adapter over a model built on the meta device from a real checkpoint's published sizes."""
    return adapter_cls(
        model,
        processor,
        source="meta",
        name="meta",
        revision=None,
        dtype="float32",
        device="cpu",
        **settings,
    )


def assert_legacy_chat_template_read(adapter_cls: Any, tiny: tuple[Path, Any], tmp_path: Path) -> None:
    """Hub checkpoints may keep the processor's template in chat_template.json, which the tokenizer
    does not read: the image-only fallback processor must still render the checkpoint's own prompt."""
    from vrp.ingest.models import load_adapter

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny[0], legacy)
    template = (legacy / "chat_template.jinja").read_text()
    (legacy / "chat_template.jinja").unlink()
    (legacy / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    processor, image_only = adapter_cls.load_processor(str(legacy))
    assert image_only and processor.chat_template == template
    assert load_adapter(str(legacy)).prompt("Is there a star?") == tiny[1].prompt("Is there a star?")


def assert_meta_modules(
    adapter: Any, *, layers: int, hidden: int, heads: int, kv_heads: int, norm: str, vocab: int
) -> None:
    """The adapter finds a real checkpoint's decoder shape and modules, all on the meta device."""
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads) == (
        layers,
        hidden,
        heads,
        kv_heads,
    )
    assert len(adapter.decoder_layers()) == layers
    assert type(adapter.final_norm()).__name__ == norm
    assert adapter.unembedding().out_features == vocab
    assert all(p.is_meta for p in adapter.model.parameters())


def assert_strategy_refused(adapter: Any, strategy: str, supported: str) -> None:
    """``encode`` refuses a checkpoint set to the unsupported feature strategy, naming the supported one."""
    adapter.model.config.vision_feature_select_strategy = strategy
    try:
        with pytest.raises(ValueError, match=f"'{supported}'"):
            adapter.encode([photo(64, 64)], ["Is there a dog?"])
    finally:
        adapter.model.config.vision_feature_select_strategy = supported


def bright_block_change(adapter: Any, size: int, rows: slice, cols: slice) -> list[np.ndarray]:
    """Per grid, how much a bright block at ``rows, cols`` of a dark ``size`` px square changes the
    layer-0 evidence (patch mixing cut by ``local_patches``): the block's cells must carry it all."""
    from vrp.ingest.capture import capture_batch

    base = np.full((size, size, 3), 20, dtype=np.uint8)
    bright = base.copy()
    bright[rows, cols] = 255
    maps = []
    with local_patches(adapter):
        for picture in (base, bright):
            enc = adapter.encode([Image.fromarray(picture)], ["Is there a star?"])
            cap = capture_batch(adapter, enc, ["yes"], max_new_tokens=1, evidence_layers=[0])
            maps.append(cap.grid_evidence[0][0])
    return [np.abs(after - before) for before, after in zip(maps[0], maps[1], strict=True)]


def assert_grid_and_stitched_maps(cap: Any, layout: Any, b: int, layer: int) -> list:
    """Row ``b``'s ``layer`` in a capture: one map per grid of its layout, each summing to 1, and a
    stitched map over the lattice that sums to 1 with every cell positive. Returns the grid maps."""
    grids = cap.grid_maps[b][layer]
    assert [g.map.shape for g in grids] == [(g.size,) for g in layout.grids]
    assert [float(g.map.sum()) for g in grids] == pytest.approx([1.0] * len(grids), abs=1e-5)
    stitched = cap.maps[b][layer]
    assert stitched.shape == (layout.stitched[0] * layout.stitched[1],)
    assert stitched.sum() == pytest.approx(1.0, abs=1e-5) and (stitched > 0).all()
    return grids


@contextlib.contextmanager
def local_patches(adapter) -> Iterator[None]:
    """Cut the attention that mixes patches (vision tower, first decoder layer), restoring it on exit.

    A random tiny model spreads one patch's change over the whole image through global attention
    (the vision tower everywhere, PaliGemma's bidirectional prefix), so where its change lands
    would say nothing about the grid. With these outputs zeroed, the first layer's residual at an
    image token depends on its own patch only: the map can then only be right if the adapter's
    positions and the grid line up.
    """
    mixing = re.compile(
        r"(vision_tower|visual|vision_model)\..*(out_proj|attn\.proj|attention\.projection_layer)$"
    )
    targets = [m for name, m in adapter.model.named_modules() if mixing.search(name)]
    targets.append(adapter.attn(0).o_proj)
    assert len(targets) > 1, "no vision attention found: the module names changed"
    saved = [
        (m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for m in targets
    ]
    try:
        with torch.no_grad():
            for module in targets:
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        yield
    finally:
        with torch.no_grad():
            for module, weight, bias in saved:
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Random pixels with none at RGB 128, so a greyed pixel always differs from the original."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[pixels == 128] = 127
    return Image.fromarray(pixels)


def changed_pixels(adapter: Any, enc: Any, cells: list[list[int]]) -> torch.Tensor:
    """Which entries of ``pixel_values`` masking ``cells`` changes; asserts each changed one is grey."""
    from vrp.interventions import mask

    masked = mask.mask_cells(adapter, enc, cells)
    original = enc.inputs["pixel_values"]
    changed = masked != original
    grey = mask.grey_value(adapter.processor).to(masked.dtype)
    shape = [1] * masked.dim()
    channel = masked.dim() - 3  # [..., C, H, W]
    shape[channel] = 3
    assert torch.equal(masked[changed], grey.view(shape).expand_as(masked)[changed])
    return changed


def ingest_multi_grid(model: Path, data: Path, lake_dir: Path, *, n_grids: int) -> None:
    """``vrp ingest run`` on a tiny multi-grid checkpoint, then the lake's per-grid and stitched rows."""
    from click.testing import CliRunner

    from vrp.cli import main
    from vrp.interventions import plan_mask, run_intervention
    from vrp.interventions.base import n_cells
    from vrp.lake import open_lake

    args = ["ingest", "run", "--model", str(model), "--data-dir", str(data), "--limit", "4"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "2", "--lake", str(lake_dir)])
    assert result.exit_code == 0, result.output
    lake = open_lake(lake_dir)
    samples = lake.arrow("samples").to_pylist()
    assert len(samples) == 4 and {s["n_grids"] for s in samples} == {n_grids}
    for table in ("attention_maps", "evidence_maps"):
        rows = lake.arrow(table).to_pylist()
        for sample in samples:
            mine = [r for r in rows if r["sample_id"] == sample["sample_id"]]
            layers = {r["layer"] for r in mine}
            assert sorted(r["tile"] for r in mine) == sorted(list(range(-1, n_grids)) * len(layers))
            for row in mine:
                assert len(row["map"]) == row["grid_h"] * row["grid_w"]
                if row["tile"] == -1:  # the stitched map is the samples row's lattice
                    assert (row["grid_h"], row["grid_w"]) == (sample["grid_h"], sample["grid_w"])
                if table == "attention_maps":
                    assert sum(row["map"]) == pytest.approx(1.0, abs=1e-5)
    maps = lake.arrow("attention_maps").to_pylist()
    for sample in samples:
        for layer in {r["layer"] for r in maps}:
            rows = {
                r["tile"]: r for r in maps if r["sample_id"] == sample["sample_id"] and r["layer"] == layer
            }
            # the stitched row's mass is the grids' mass, the layer's image mass less the newline tokens'
            assert rows[-1]["mass"] == pytest.approx(sum(rows[t]["mass"] for t in range(n_grids)), rel=1e-5)

    # image conditions and patch masking run on the image run unchanged
    for condition in ("none", "blank"):
        result = CliRunner().invoke(
            main, [*args, "--batch-size", "2", "--lake", str(lake_dir), "--image-condition", condition]
        )
        assert result.exit_code == 0, result.output
    (run_id,) = {s["run_id"] for s in samples}
    plan = plan_mask(open_lake(lake_dir), run_id, ratio=0.3, layer=-1, seed=1)
    run_intervention(plan, str(lake_dir), echo=lambda _line: None)
    rows = open_lake(lake_dir).arrow("interventions").to_pylist()
    assert sorted({r["condition"] for r in rows}) == ["full", "high", "low", "random"] and len(rows) == 16
    cells = {
        s["sample_id"]: sum(
            r["grid_h"] * r["grid_w"]
            for r in maps
            if r["sample_id"] == s["sample_id"] and r["layer"] == plan.layer and r["tile"] >= 0
        )
        for s in samples
    }
    # the viewer draws the stitched map over the original image
    from vrp.view import write_view
    from vrp.view.build import page_key

    write_view(open_lake(lake_dir), lake_dir.parent / "view")
    for sample in samples:
        text = (
            lake_dir.parent / "view" / "data" / "s" / f"{page_key(run_id, sample['sample_id'])}.js"
        ).read_text()
        page = json.loads(text.removeprefix("VRP.sample(").removesuffix(");\n"))
        assert page["grid"] == [sample["grid_h"], sample["grid_w"]]
        assert len(page["attention"]["layers"]) == len(page["evidence"]["layers"]) > 0
        assert all(r["cells"] is None for r in page["interventions"]), "flat grid cells are not lattice cells"
    for row in rows:
        patches = json.loads(row["detail"])["patches"]
        assert len(patches) == (0 if row["condition"] == "full" else n_cells(0.3, cells[row["sample_id"]]))
        assert all(0 <= p < cells[row["sample_id"]] for p in patches)
