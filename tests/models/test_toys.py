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


def test_taught_answers_score_as_the_main_answer() -> None:
    from vrp.ingest.datasets.shapes_vqa import image_questions
    from vrp.tasks.vqa import is_correct, normalise_vqa_answer
    from vrp.toys.train import taught_answer

    assert taught_answer("2 ") == "two" and taught_answer("Red.") == "red"
    assert taught_answer("1 shape") == "one shape"  # a main answer that stopped a training run
    rows = [r for im in render_images(120, 11) for r in image_questions(im, 11)]
    counted = [
        r for r in rows if " " in r["multiple_choice_answer"] and r["multiple_choice_answer"][0].isdigit()
    ]
    assert counted  # "4 shapes" won the vote somewhere: numbers inside longer answers are covered
    for row in rows:
        taught = taught_answer(row["multiple_choice_answer"])
        assert normalise_vqa_answer(taught) == normalise_vqa_answer(row["multiple_choice_answer"])
        assert is_correct("exact", taught, row["multiple_choice_answer"], 0.0)


def test_every_taught_answer_is_inside_the_grown_vocabulary() -> None:
    """A main answer with a word the grown tokenizer lacks stops a training run mid-way ("squares",
    an annotator's plural that won the vote, stopped three after 200 steps)."""
    import re

    from vrp.ingest.datasets.shapes_vqa import image_questions
    from vrp.toys.train import open_vocabulary, taught_answer

    words = set(open_vocabulary())
    rows = [r for seed in (11, 404) for im in render_images(400, seed) for r in image_questions(im, seed)]
    assert any(
        r["multiple_choice_answer"].endswith("s")
        and " " not in r["multiple_choice_answer"]
        and not r["multiple_choice_answer"][0].isdigit()
        and r["multiple_choice_answer"] != "shapes"
        for r in rows
    )  # a plural shape won somewhere: the case is covered
    missing = {
        w for r in rows for w in re.findall(r"\w+|[^\w\s]", taught_answer(r["multiple_choice_answer"]))
    }
    assert missing - words == set()


def test_warm_start_grows_the_vocabulary_without_moving_old_outputs(tmp_path: Path) -> None:
    import shutil
    from collections import Counter

    from vrp.ingest.datasets.shapes_vqa import image_questions
    from vrp.tasks.vqa import is_correct
    from vrp.toys.train import evaluate_vqa, extend_vocabulary, grow_embeddings, open_vocabulary

    source = tmp_path / "source"
    train_toy(ToyTrainConfig(family="paligemma", seed=3, steps=1, minutes=None, **SMALL), source)
    old = load_adapter(str(source))
    old_vocab = old.tokenizer.get_vocab()

    # growing alone: words keep their ids, PaliGemma's <loc>/<seg> tokens move up past the new
    # words (as a reload numbers them), and no old token's logit moves
    grown_dir = tmp_path / "grown"
    shutil.copytree(source, grown_dir)
    growth = extend_vocabulary(grown_dir, open_vocabulary())
    added = list(growth.tokens)
    assert {"How", "many", "at", "using", "question"} <= set(added)
    grown = load_adapter(str(grown_dir))
    new_vocab = grown.tokenizer.get_vocab()
    assert len(new_vocab) == len(old_vocab) + len(added)
    assert sorted(new_vocab[t] for t in added) == list(range(growth.at, growth.at + len(added)))
    moved = {t: i + (len(added) if i >= growth.at else 0) for t, i in old_vocab.items()}
    assert {t: new_vocab[t] for t in old_vocab} == moved
    assert old_vocab["<loc0000>"] >= growth.at  # the case the layout exists for
    grow_embeddings(grown.model, growth, seed=5)
    image = render_images(1, 9)[0].image
    with torch.no_grad():
        enc_old = old.encode([image], [question_for("red circle")])
        enc_new = grown.encode([image], [question_for("red circle")])
        assert torch.equal(enc_old.inputs["input_ids"], enc_new.inputs["input_ids"])
        before = old.model(**enc_old.inputs).logits
        after = grown.model(**enc_new.inputs).logits
    assert after.shape[-1] == len(old_vocab) + len(added)
    order = torch.tensor([moved[t] for t, _ in sorted(old_vocab.items(), key=lambda item: item[1])])
    torch.testing.assert_close(after[..., order], before, rtol=0, atol=1e-6)
    prompt = grown.tokenizer("How many shapes are there?\nAnswer the question using a single word or phrase.")
    assert grown.tokenizer.unk_token_id not in prompt["input_ids"]

    # a warm-started run on both tasks records where it began and the open questions' accuracy
    tuned_cfg = ToyTrainConfig(
        family="paligemma",
        seed=6,
        steps=2,
        minutes=None,
        init_from=str(source),
        vqa_share=0.5,
        **SMALL,
    )
    card = train_toy(tuned_cfg, tmp_path / "tuned")
    assert card["training"]["init"]["from"] == "toy-paligemma"
    assert card["training"]["init"]["training"]["seed"] == 3
    assert card["training"]["added_tokens"] == added
    assert card["training"]["added_tokens_at"] == growth.at
    assert card["config"]["vocab_size"] == len(old_vocab) + len(added)
    vqa = card["evaluation"]["vqa"]
    images = render_images(SMALL["eval_images"], tuned_cfg.eval_seed)
    rows = [r for im in images for r in image_questions(im, tuned_cfg.eval_seed)]
    assert vqa["questions"] == len(rows)
    for qtype, entry in vqa["by_type"].items():
        golds = [r["multiple_choice_answer"] for r in rows if r["question_type"] == qtype]
        majority = Counter(golds).most_common(1)[0][0]
        assert entry["majority_answer"] == majority
        assert entry["majority_baseline"] == sum(
            is_correct("lenient", majority, g, 0.0) for g in golds
        ) / len(golds)
    tuned = load_adapter(str(tmp_path / "tuned"))
    assert evaluate_vqa(tuned, images, tuned_cfg.eval_seed) == {
        k: v for k, v in vqa.items() if k in ("questions", "accuracy", "by_type")
    }
    assert not (tmp_path / "tuned" / "checkpoint.json").exists()
