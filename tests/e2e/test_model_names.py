"""Different checkpoints never share a `model` name in the lake (per-model analyses group by it)."""

from __future__ import annotations

import pytest
import torch
from lake_util import ingest, make_run, sample_ids

from vrp.ingest.datasets import generate_shapes_pope
from vrp.ingest.models.loading import REGISTRY, resolve_source
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import LakeValidationError, open_lake


def test_a_folder_whose_name_sanitises_to_a_registry_name_gets_its_own_name(tmp_path):
    folder = build_tiny("paligemma", tmp_path / "toy llava", seed=0, num_layers=1)
    source, name = resolve_source(str(folder))
    assert source == str(folder.resolve())
    assert name != "toy-llava" and name.startswith("toy-llava-") and len(name) == len("toy-llava-") + 6
    other = build_tiny("paligemma", tmp_path / "elsewhere" / "toy llava", seed=0, num_layers=1)
    assert resolve_source(str(other))[1] != name  # the hash is of the source
    assert resolve_source("toy-llava")[1] == "toy-llava"  # the registry's own keeps its name
    assert resolve_source(REGISTRY["toy-llava"])[1] == "toy-llava"  # also given as its folder


def test_a_folder_named_exactly_like_a_registry_model_is_renamed(tmp_path):
    folder = build_tiny("qwen2vl", tmp_path / "qwen2-vl-2b", seed=0, num_layers=1)
    name = resolve_source(str(folder))[1]
    assert name.startswith("qwen2-vl-2b-") and name != "qwen2-vl-2b"
    assert "qwen2-vl-2b" in REGISTRY


def test_a_plain_folder_name_is_kept(tmp_path):
    folder = build_tiny("llava", tmp_path / "my-llava_v2", seed=0, num_layers=1)
    assert resolve_source(str(folder))[1] == "my-llava_v2"


def test_the_lake_refuses_a_model_name_stored_for_another_family_or_checkpoint(tmp_path):
    root = str(tmp_path / "lake")
    ingest(root, make_run("run-a", family="llava"), sample_ids(2))
    with pytest.raises(LakeValidationError, match="already belongs to a llava checkpoint"):
        ingest(root, make_run("run-b", family="paligemma", model_source="/x/y", model_revision="r9"), ["z"])
    with pytest.raises(LakeValidationError, match="rename its folder"):
        ingest(root, make_run("run-c", model_source="/elsewhere", model_revision="sha256:other"), ["z"])
    # the same checkpoint moved (same revision) keeps its name
    ingest(root, make_run("run-d", model_source="/moved/here"), sample_ids(2))
    assert sorted(open_lake(root).arrow("runs").column("run_id").to_pylist()) == ["run-a", "run-d"]
    # and so does one retrained in place (same source)
    other = str(tmp_path / "other")
    ingest(other, make_run("run-a"), sample_ids(2))
    ingest(other, make_run("run-e", model_revision="rev-2"), sample_ids(2))
    assert sorted(open_lake(other).arrow("runs").column("run_id").to_pylist()) == ["run-a", "run-e"]


def test_ingesting_a_paligemma_in_a_toy_llava_folder_keeps_the_models_apart(tmp_path):
    torch.set_num_threads(1)
    data = generate_shapes_pope(tmp_path / "shapes", images=2, seed=3)
    impostor = build_tiny("paligemma", tmp_path / "toy llava", seed=0, num_layers=1)
    real = build_tiny("llava", tmp_path / "real" / "toy-llava-build", seed=0, num_layers=1)
    lake_dir = str(tmp_path / "lake")
    common = {"dataset": "shapes-pope", "data_dir": str(data), "limit": 2, "self_consistency": 0}
    run_ingest(IngestOptions(model=str(real), **common), lake_dir, echo=lambda _line: None)
    run_ingest(IngestOptions(model=str(impostor), **common), lake_dir, echo=lambda _line: None)
    models = dict(open_lake(lake_dir).sql("SELECT model, family FROM runs").fetchall())
    assert len(models) == 2 and sorted(models.values()) == ["llava", "paligemma"]
    assert not any(name == "toy-llava" for name, family in models.items() if family == "paligemma")
