"""The shipped toy models: loadable through the registry, inside the accuracy targets on both tasks
(shapes-POPE yes/no and shapes-VQA open questions), and using the image."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrp.ingest.datasets import generate_shapes_pope, generate_shapes_vqa, load_dataset, load_image
from vrp.ingest.models import REGISTRY, load_adapter
from vrp.ingest.prompts import DATASET_PROMPTS, apply_template
from vrp.tasks import get_task
from vrp.tasks.yesno import parse_answer

TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")
HELD_OUT_SEED = 777  # never used for training (the cards record the training seeds)
QUESTIONS = 300  # per task
POPE_FLOOR = 0.80  # the shipped toys' cards: 0.80-0.90 per split; a toy may not answer worse
VQA_RANGE = (0.60, 0.95)  # lenient accuracy: answers well, not perfectly
BLANK_DROP = 0.10


@pytest.fixture(scope="module")
def pope(tmp_path_factory) -> list:
    folder = generate_shapes_pope(
        tmp_path_factory.mktemp("heldout") / "shapes", images=60, seed=HELD_OUT_SEED
    )
    samples, errors = load_dataset("shapes-pope", data_dir=folder)
    assert not errors
    per_split: dict[str, list] = {}
    for sample in samples:
        per_split.setdefault(sample.split, []).append(sample)
    chosen = [s for split in ("random", "popular", "adversarial") for s in per_split[split][: QUESTIONS // 3]]
    assert len(chosen) == QUESTIONS
    return chosen


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> list:
    folder = generate_shapes_vqa(tmp_path_factory.mktemp("heldout") / "vqa", images=70, seed=HELD_OUT_SEED)
    samples, errors = load_dataset("shapes-vqa", data_dir=folder)
    assert not errors
    assert len(samples) >= QUESTIONS
    return samples[:QUESTIONS]


def _grey(image: Image.Image) -> Image.Image:
    """The `blank` condition: uniform grey (RGB 128) at the original size."""
    return Image.new("RGB", image.size, (128, 128, 128))


def _pope_answers(adapter, samples, blank: bool) -> list[str | None]:
    """Greedy first-token answers, parsed like any other yes/no answer."""
    out = []
    for start in range(0, len(samples), 50):
        batch = samples[start : start + 50]
        images = [load_image(s) for s in batch]
        if blank:
            images = [_grey(image) for image in images]
        enc = adapter.encode(images, [s.question for s in batch])
        with torch.no_grad():
            logits = adapter.model(**enc.inputs).logits[torch.arange(len(batch)), enc.answer_pos]
        tokens = adapter.tokenizer.batch_decode(logits.argmax(-1)[:, None])
        out.extend(parse_answer(text)[0] for text in tokens)
    return out


def _vqa_correct(adapter, samples, blank: bool) -> list[bool]:
    """Greedy answers of up to 8 tokens (as `vrp ingest run` decodes them), scored by the open task's
    lenient rule against each question's main answer."""
    task = get_task("open", correct_rule="lenient")
    template = DATASET_PROMPTS["shapes-vqa"]
    out = []
    for start in range(0, len(samples), 50):
        batch = samples[start : start + 50]
        images = [load_image(s) for s in batch]
        if blank:
            images = [_grey(image) for image in images]
        enc = adapter.encode(images, [apply_template(template, s.question) for s in batch])
        with torch.no_grad():
            generated = adapter.model.generate(
                **enc.inputs, do_sample=False, max_new_tokens=8, pad_token_id=adapter.tokenizer.pad_token_id
            )
        texts = adapter.tokenizer.batch_decode(
            generated[:, enc.inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for text, sample in zip(texts, batch, strict=True):
            answer, _ = task.parse(text)
            correct, _ = task.score(answer, sample)
            out.append(bool(correct))
    return out


def _majority_baseline(samples) -> dict[str, float]:
    """Per question type: the accuracy of always giving the type's most frequent main answer."""
    task = get_task("open", correct_rule="lenient")
    out = {}
    for qtype in sorted({s.question_type for s in samples}):
        part = [s for s in samples if s.question_type == qtype]
        majority = Counter(s.label for s in part).most_common(1)[0][0]
        out[qtype] = float(np.mean([task.score(majority, s)[0] for s in part]))
    return out


@pytest.mark.parametrize("name", TOYS)
def test_toy_answers_well_but_not_perfectly_and_uses_the_image(name, pope, vqa) -> None:
    torch.set_num_threads(1)
    assert Path(REGISTRY[name]).is_dir(), f"{name} is not shipped in the package"
    adapter = load_adapter(name)

    labels = np.array([s.label for s in pope])
    accuracy = float((np.array(_pope_answers(adapter, pope, blank=False), dtype=object) == labels).mean())
    assert POPE_FLOOR <= accuracy < 0.98, f"{name}: POPE accuracy {accuracy:.3f} on {QUESTIONS} questions"
    blank = float((np.array(_pope_answers(adapter, pope, blank=True), dtype=object) == labels).mean())
    assert accuracy - blank >= BLANK_DROP, f"{name}: POPE {accuracy:.3f} with images, {blank:.3f} blank"

    correct = np.array(_vqa_correct(adapter, vqa, blank=False))
    vqa_accuracy = float(correct.mean())
    assert VQA_RANGE[0] <= vqa_accuracy <= VQA_RANGE[1], f"{name}: shapes-VQA accuracy {vqa_accuracy:.3f}"
    types = np.array([s.question_type for s in vqa])
    for qtype, baseline in _majority_baseline(vqa).items():
        part = float(correct[types == qtype].mean())
        assert part > baseline, f"{name}: {qtype!r} accuracy {part:.3f} <= majority baseline {baseline:.3f}"
    vqa_blank = float(np.mean(_vqa_correct(adapter, vqa, blank=True)))
    assert vqa_accuracy - vqa_blank >= BLANK_DROP, (
        f"{name}: shapes-VQA {vqa_accuracy:.3f} with images, {vqa_blank:.3f} blank"
    )

    card = json.loads((Path(REGISTRY[name]) / "card.json").read_text())
    assert set(card["evaluation"]["accuracy"]) >= {"random", "popular", "adversarial"}
    assert set(card["evaluation"]["vqa"]["by_type"]) == set(types)
    assert HELD_OUT_SEED not in (card["training"]["seed"], card["evaluation"]["seed"])
