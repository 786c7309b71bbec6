"""Shared test settings and fixtures: deterministic, single-threaded torch, no network.

Fixtures (heavy imports happen inside them, so tests that need no model never load torch):

- ``tiny_checkpoint(family, out_dir=None, **sizes)``: a tiny random-init checkpoint of a family,
  built offline with its real config and processor classes (``build_tiny``).
- ``tiny_adapter(family, **sizes)``: that checkpoint loaded the way a user's model is.
- ``shapes_workspace(name, images=, seed=)``: a fresh folder with a shapes-POPE set in it,
  returned as ``(root, data_dir)``.
- ``refused_intervention(lake_dir, *args)``: runs ``vrp intervene ARGS`` with a model path that
  does not exist and returns the error, asserting that it failed before any model was loaded.

Each is a factory, so every test module states its own sizes and seeds next to its tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vrp.ingest.models import Adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_torch() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    def build(family: str, out_dir: Path | None = None, **sizes: Any) -> Path:
        from vrp.ingest.models.tiny import build_tiny

        _quiet_torch()
        return build_tiny(family, out_dir or tmp_path_factory.mktemp(family), **sizes)

    return build


@pytest.fixture(scope="session")
def tiny_adapter(tiny_checkpoint: Callable[..., Path]) -> Callable[..., Adapter]:
    def load(family: str, **sizes: Any) -> Adapter:
        from vrp.ingest.models import load_adapter

        return load_adapter(str(tiny_checkpoint(family, **sizes)))

    return load


@pytest.fixture(scope="session")
def shapes_workspace(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    def make(name: str, *, images: int, seed: int) -> tuple[Path, Path]:
        from vrp.ingest.datasets import generate_shapes_pope

        _quiet_torch()
        root = tmp_path_factory.mktemp(name)
        return root, generate_shapes_pope(root / "shapes", images=images, seed=seed)

    return make


@pytest.fixture
def refused_intervention(tmp_path: Path) -> Callable[..., str]:
    def fails(lake_dir: str, *args: str) -> str:
        from click.testing import CliRunner

        from vrp.cli import main

        nowhere = str(tmp_path / "no-model")
        result = CliRunner().invoke(main, ["intervene", *args, "--model", nowhere, "--lake", lake_dir])
        assert result.exit_code != 0, result.output
        assert "no-model" not in result.output, "the model must not have been loaded"
        return result.output

    return fails
