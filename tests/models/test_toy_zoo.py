"""The shipped toy models: loadable through the registry, good but not perfect, and using the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrp.ingest.datasets import generate_shapes_pope, load_dataset, load_image
from vrp.ingest.models import REGISTRY, load_adapter
from vrp.tasks.yesno import parse_answer

TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")
HELD_OUT_SEED = 777  # never used for training (the cards record the training seeds)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    folder = generate_shapes_pope(
        tmp_path_factory.mktemp("heldout") / "shapes", images=110, seed=HELD_OUT_SEED
    )
    samples, errors = load_dataset("shapes-pope", data_dir=folder)
    assert not errors
    per_split: dict[str, list] = {}
    for sample in samples:
        per_split.setdefault(sample.split, []).append(sample)
    chosen = [s for split in ("random", "popular", "adversarial") for s in per_split[split][:200]]
    assert len(chosen) == 600
    return chosen


def _answers(adapter, samples, blank: bool) -> list[str | None]:
    """Greedy first-token answers, parsed like any other answer."""
    out = []
    for start in range(0, len(samples), 50):
        batch = samples[start : start + 50]
        images = [load_image(s) for s in batch]
        if blank:
            images = [Image.new("RGB", image.size, (255, 255, 255)) for image in images]
        enc = adapter.encode(images, [s.question for s in batch])
        with torch.no_grad():
            logits = adapter.model(**enc.inputs).logits[torch.arange(len(batch)), enc.answer_pos]
        tokens = adapter.tokenizer.batch_decode(logits.argmax(-1)[:, None])
        out.extend(parse_answer(text)[0] for text in tokens)
    return out


@pytest.mark.parametrize("name", TOYS)
def test_toy_answers_well_but_not_perfectly_and_uses_the_image(name, held_out) -> None:
    torch.set_num_threads(1)
    assert Path(REGISTRY[name]).is_dir(), f"{name} is not shipped in the package"
    adapter = load_adapter(name)
    labels = np.array([s.label for s in held_out])
    answers = np.array(_answers(adapter, held_out, blank=False), dtype=object)
    accuracy = float((answers == labels).mean())
    assert 0.70 < accuracy < 0.98, f"{name}: accuracy {accuracy:.3f} on 600 held-out questions"
    blank = np.array(_answers(adapter, held_out, blank=True), dtype=object)
    blank_accuracy = float((blank == labels).mean())
    assert accuracy - blank_accuracy >= 0.10, (
        f"{name}: {accuracy:.3f} with images, {blank_accuracy:.3f} blank"
    )

    card = json.loads((Path(REGISTRY[name]) / "card.json").read_text())
    assert set(card["evaluation"]["accuracy"]) >= {"random", "popular", "adversarial"}
    assert HELD_OUT_SEED not in (card["training"]["seed"], card["evaluation"]["seed"])
