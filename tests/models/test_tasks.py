"""The answer tasks: VQA normalisation and accuracy by hand, the correct rules, the teacher-forced
truth token and the open task's capture against the model's own logits, on all three families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vrp.ingest.capture import capture_batch
from vrp.ingest.models import load_adapter
from vrp.ingest.models.tiny import build_tiny
from vrp.tasks import TaskError, get_task
from vrp.tasks.base import Label
from vrp.tasks.vqa import is_correct, normalise_vqa_answer, vqa_accuracy
from vrp.toys.train import Batch, with_answers

FAMILIES = ("llava", "paligemma", "qwen2vl")
QUESTIONS = ["What color is the square?", "How many shapes are there?"]
GOLDS = ["blue square", "two"]  # a two-token answer, and one the vocabulary spells as a single word


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("teddy-bear", "teddy bear"),
        ("it's", "it's"),
        ("  RED!", "red"),
        ("dont", "don't"),
        ("A Dog, running", "dog running"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
    ],
)
def test_vqa_normalisation(text: str, normalised: str) -> None:
    assert normalise_vqa_answer(text) == normalised


def test_vqa_accuracy_hand_worked() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    # each of the 3 matching annotators sees 2 others match (2/3); each of the other 7 sees 3 (1)
    assert vqa_accuracy("2", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10) == pytest.approx(0.9)
    one = ["2"] + ["3"] * 9
    assert vqa_accuracy("2", one) == pytest.approx(0.3)
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("four", ["2"] * 10) == 0.0
    assert vqa_accuracy("Two.", ["two"] * 2 + ["2 shapes"] * 8) == pytest.approx(0.6)


def test_each_correct_rule() -> None:
    assert is_correct("exact", "Dog", "the dog", 1.0)
    assert not is_correct("exact", "black dog", "dog", 1.0)
    assert is_correct("lenient", "black dog", "dog", 0.0)  # substring either way
    assert is_correct("lenient", "dog", "black dog", 0.0)
    assert not is_correct("lenient", "cat", "dog", 1.0)
    assert is_correct("vqa", "cat", "dog", 0.5) and not is_correct("vqa", "dog", "dog", 0.3)
    with pytest.raises(ValueError):
        is_correct("loose", "a", "a", 1.0)


def test_open_task_parses_and_scores() -> None:
    task = get_task("open", correct_rule="exact")
    assert task.parse("Two.\nBecause I counted.") == ("2", "ok")
    assert task.parse("  \n2") == (None, "unknown")
    gold = Label("2", ("2",) * 3 + ("3",) * 7)
    assert task.score("2", gold) == (True, pytest.approx(0.9))
    assert task.score(None, gold) == (None, None)
    assert task.score("2", Label(None, None)) == (None, None)  # test-dev: stored, not scored
    with pytest.raises(TaskError):
        get_task("open", correct_rule="loose")


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tmp_path_factory):
    torch.set_num_threads(1)
    path = build_tiny(
        request.param,
        tmp_path_factory.mktemp(request.param),
        seed=1,
        num_layers=2,
        hidden_size=64,
        vocab_words=["color", "how", "many", "shapes", "are", "what", "two"],
    )
    return load_adapter(str(path))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in QUESTIONS]


def test_truth_token_is_the_first_token_of_a_teacher_forced_sequence(adapter) -> None:
    images = _images()
    # independently: the answer's own tokens appended after the encoded prompt (the toy trainer's
    # teacher forcing), whose first target is the first answer token
    inputs, targets = with_answers(adapter, Batch(images, QUESTIONS, GOLDS))
    prompt_len = adapter.encode(images, QUESTIONS).inputs["input_ids"].shape[1]
    for b, (image, question, gold) in enumerate(zip(images, QUESTIONS, GOLDS, strict=True)):
        ids = adapter.answer_ids(image, question, gold)
        assert ids[0] == int(targets[b, prompt_len - 1]) == int(inputs["input_ids"][b, prompt_len])
        words = adapter.tokenizer.convert_ids_to_tokens(ids[: len(gold.split())])
        assert words == gold.split()


def test_open_capture_truth_statistics_equal_the_models_own_logits(adapter) -> None:
    images = _images()
    enc = adapter.encode(images, QUESTIONS)
    golds = [Label(g, (g,) * 10) for g in GOLDS]
    task = get_task("open")
    cap = capture_batch(adapter, enc, golds, task=task, images=images, questions=QUESTIONS, max_new_tokens=3)
    inputs, targets = with_answers(adapter, Batch(images, QUESTIONS, GOLDS))
    prompt_len = enc.inputs["input_ids"].shape[1]
    with torch.no_grad():  # a fresh teacher-forced forward
        logits = adapter.model(**inputs).logits[:, prompt_len - 1].double()
    for b in range(len(QUESTIONS)):
        truth = int(targets[b, prompt_len - 1])
        logp = torch.log_softmax(logits[b], -1)
        others = logits[b].clone()
        others[truth] = -torch.inf
        margin = float(logits[b, truth] - others.max())
        sample = cap.samples[b]
        assert sample["truth_prob"] == pytest.approx(float(logp[truth].exp()), abs=1e-5)
        assert sample["truth_margin"] == pytest.approx(margin, abs=1e-5)
        assert sample["truth_rank"] == int((logits[b] > logits[b, truth]).sum())
        assert cap.layers[b][-1]["lens_truth_margin"] == pytest.approx(margin, abs=1e-5)
        assert cap.layers[b][-1]["lens_truth_rank"] == sample["truth_rank"]
        for column in ("p_yes", "p_no", "yes_no_margin"):
            assert column not in sample  # the yes/no columns stay null for open answers
        assert "lens_yes_no_margin" not in cap.layers[b][-1]
        answer, _status = task.parse(cap.samples[b]["answer_text"])
        assert sample["answer"] == answer
        assert sample["score"] == (None if answer is None else vqa_accuracy(answer, golds[b].answers))


def test_open_capture_without_a_gold_answer_keeps_truth_null(adapter) -> None:
    images = _images()[:1]
    enc = adapter.encode(images, QUESTIONS[:1])
    cap = capture_batch(
        adapter, enc, [Label(None, None)], task=get_task("open"), images=images, questions=QUESTIONS[:1]
    )
    assert cap.samples[0]["truth_margin"] is None and cap.samples[0]["score"] is None
    assert cap.samples[0]["correct"] is None
    assert all(row["lens_truth_margin"] is None for row in cap.layers[0])
    assert cap.nonfinite[0] is None


def test_a_sentencepiece_style_tokenizer_gives_the_space_marked_truth_token(tmp_path) -> None:
    """LLaVA's answer follows "ASSISTANT:" after a space: with SentencePiece-style pieces the truth
    token of "2" is "▁2", not the bare "2" (both exist), and it is the teacher-forced sequence's."""
    from tokenizers import pre_tokenizers

    torch.set_num_threads(1)
    path = build_tiny(
        "llava", tmp_path / "llava", seed=3, num_layers=2, hidden_size=64, vocab_words=["2", "▁2"]
    )
    adapter = load_adapter(str(path))
    tokenizer = adapter.tokenizer
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never"
    )
    spaced, bare = tokenizer.convert_tokens_to_ids(["▁2", "2"])
    assert spaced != bare and tokenizer.unk_token_id not in (spaced, bare)
    image, question = _images()[0], QUESTIONS[1]

    ids = adapter.answer_ids(image, question, "2")
    assert ids[0] == spaced
    enc = adapter.encode([image], [question])
    prompt_len = enc.inputs["input_ids"].shape[1]
    full = adapter.processor(images=[image], text=[adapter.prompt(question) + " 2"], return_tensors="pt")
    assert torch.equal(full["input_ids"][0, :prompt_len], enc.inputs["input_ids"][0])
    assert int(full["input_ids"][0, prompt_len]) == spaced
    with torch.no_grad():  # a fresh teacher-forced forward over prompt + answer
        logits = adapter.model(**full).logits[0, prompt_len - 1].double()
    cap = capture_batch(
        adapter, enc, [Label("2", ("2",) * 10)], task=get_task("open"), images=[image], questions=[question]
    )
    assert cap.samples[0]["truth_prob"] == pytest.approx(float(torch.softmax(logits, -1)[spaced]), abs=1e-5)
