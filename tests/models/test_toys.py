"""Toy trainer: a few steps reduce the loss, the run is deterministic, the checkpoint loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vrp.ingest.datasets.shapes import CLASSES, question_for, render_images
from vrp.ingest.models import load_adapter
from vrp.ingest.models.tiny import build_tiny
from vrp.toys.train import STATS_IMAGES, ToyTrainConfig, _build_kwargs, lr_at, pixel_stats, train_toy

SMALL = dict(
    batch_size=16,
    lr=3e-3,
    warmup_steps=1,
    hidden_size=64,
    num_layers=2,
    vision_hidden_size=32,
    vision_layers=2,
    vision_heads=2,
    eval_images=4,
    evals=1,
    caption_share=0.0,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _yes_no_loss(adapter, seed: int) -> float:
    """Cross-entropy of the right first answer word on fixed questions, computed straight from the
    logits at the answer position (independently of the trainer's loss code)."""
    images = render_images(24, seed + 7_000_000)
    pictures, questions, targets = [], [], []
    rng = np.random.default_rng(5)
    for im in images:
        for label in ("yes", "no"):
            absent = [c for c in range(len(CLASSES)) if c not in im.present]
            cls = im.present[0] if label == "yes" else absent[int(rng.integers(len(absent)))]
            pictures.append(im.image)
            questions.append(question_for(CLASSES[cls].name))
            targets.append(adapter.tokenizer.convert_tokens_to_ids(label))
    with torch.no_grad():
        enc = adapter.encode(pictures, questions)
        logits = adapter.model(**enc.inputs).logits[torch.arange(len(questions)), enc.answer_pos]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-logp[torch.arange(len(targets)), torch.tensor(targets)].mean())


def test_a_few_steps_reduce_the_loss(tmp_path: Path) -> None:
    cfg = ToyTrainConfig(family="llava", seed=3, steps=10, minutes=None, **SMALL)
    card = train_toy(cfg, tmp_path / "trained")
    reference = render_images(STATS_IMAGES, cfg.seed)
    mean, std = pixel_stats([im.image for im in reference])
    build_tiny("llava", tmp_path / "untrained", **_build_kwargs(cfg, mean, std))

    trained = load_adapter(str(tmp_path / "trained"))
    untrained = load_adapter(str(tmp_path / "untrained"))
    before, after = _yes_no_loss(untrained, cfg.seed), _yes_no_loss(trained, cfg.seed)
    assert after < before - 1.0, (before, after)

    # the image processor carries the training data's own pixel statistics (checked with plain numpy)
    pixels = np.concatenate([np.asarray(im.image, dtype=np.float64).reshape(-1, 3) for im in reference]) / 255
    np.testing.assert_allclose(trained.processor.image_processor.image_mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(trained.processor.image_processor.image_std, pixels.std(0), rtol=1e-9)

    saved = json.loads((tmp_path / "trained" / "card.json").read_text())
    assert saved == card
    assert saved["training"]["steps"] == 10 and saved["family"] == "llava"
    assert set(saved["evaluation"]["accuracy"]) == {"random", "popular", "adversarial"}
    assert saved["evaluation"]["seed"] != cfg.seed
    assert (tmp_path / "trained" / "model.safetensors").is_file()


@pytest.mark.parametrize("family", ["paligemma", "qwen2vl"])
def test_training_is_deterministic(tmp_path: Path, family: str) -> None:
    cfg = ToyTrainConfig(family=family, seed=4, steps=2, minutes=None, **{**SMALL, "caption_share": 0.5})
    first = train_toy(cfg, tmp_path / "a")
    second = train_toy(cfg, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["history"] == [{**second["history"][0], "seconds": first["history"][0]["seconds"]}]
    untrained = load_file(
        build_tiny(family, tmp_path / "c", seed=4, hidden_size=64, num_layers=2, vision_hidden_size=32)
        / "model.safetensors"
    )
    assert any(not torch.equal(a[k], untrained[k]) for k in a if k in untrained)


def test_refuses_the_benchmark_seed() -> None:
    with pytest.raises(ValueError, match="default evaluation benchmark"):
        ToyTrainConfig(family="llava", seed=1234)


def test_learning_rate_schedule_by_hand() -> None:
    cfg = ToyTrainConfig(family="llava", steps=100, minutes=None, lr=1.0, min_lr_ratio=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 60, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(30, cfg, 60, 100) == 1.0 and lr_at(30, cfg, None, None) == 1.0
    assert lr_at(80, cfg, 60, 100) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(100, cfg, 60, 100) == pytest.approx(0.1)
