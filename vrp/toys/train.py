"""Train a toy VLM of one family on shapes-POPE, with plain PyTorch on the CPU.

Random-init models answer at chance, so nothing VRP measures on them means anything. A toy model
is a real ``LlavaForConditionalGeneration`` / ``PaliGemmaForConditionalGeneration`` /
``Qwen2VLForConditionalGeneration`` at a tiny size (built by ``vrp.ingest.models.tiny.build_tiny``)
trained until it answers shapes-POPE questions well but not perfectly.

What made such training work (docs/ARCHITECTURE.md section 8), all done here:

- pixels normalised with the training images' own per-channel mean/std (with 0.5/0.5 the vision
  features collapse), built into the saved image processor so inference sees the same;
- shapes-POPE's class colours (base colour + jitter) rather than arbitrary colours;
- an auxiliary captioning task ("What is in the image?" -> "red circle and blue square") mixed
  into the yes/no questions, which forces the vision features to carry every object;
- answers taught as the tokens after the prompt the adapter builds for inference, followed by the
  end token; for PaliGemma they get ``token_type_ids`` 1 (what the processor's ``suffix=`` does),
  so the answer never leaks into the bidirectionally attended prefix.

Open questions (shapes-VQA) join with ``vqa_share``: that share of each batch asks one of the
image's shapes-VQA questions (the benchmark's own generator and short-answer prompt) and teaches its
``multiple_choice_answer`` (numbers as words, which the word-level tokenizer has and the VQA
normalisation maps back to digits). ``init_from`` warm-starts from a trained toy: its weights,
processor and pixel statistics are kept, and the words the open questions add to the word-level
vocabulary get new rows in the embedding and output matrices (see :func:`extend_vocabulary`).

Training is deterministic given the seed, the number of steps and the thread count: batch ``s``
is built from images ``s * batch .. (s + 1) * batch - 1`` of the training seed and from per-step
random generators. The learning rate warms up, stays constant, then decays (cosine) over the last
steps. With ``minutes`` instead of ``steps``, the run keeps the constant rate until ``decay_share``
of the budget is left, then fixes the remaining step count from the pace measured so far; the card
records ``steps`` and ``decay_start``, and ``steps=`` + ``decay_start=`` reproduce the weights.

Usage::

    card = train_toy(ToyTrainConfig(family="llava", minutes=15), "toys/llava")
    tuned = train_toy(
        ToyTrainConfig(family="llava", seed=202, minutes=30, init_from="vrp/toys/toy-llava", vqa_share=0.5),
        "toys/llava-vqa",
    )
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vrp.ingest.datasets.pope import SPLITS
from vrp.ingest.datasets.shapes import (
    CAPTION_QUESTION,
    CLASSES,
    DEFAULT_SEED,
    caption_for,
    class_statistics,
    make_questions,
    negatives,
    question_for,
    render_image,
    render_images,
    vocabulary,
)
from vrp.ingest.datasets.shapes_vqa import NUMBER_WORDS, SHAPE_NAMES, image_questions
from vrp.ingest.models import registry
from vrp.ingest.prompts import DATASET_PROMPTS, apply_template
from vrp.tasks.vqa import is_correct, normalise_vqa_answer
from vrp.tasks.yesno import yes_no_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from vrp.ingest.datasets.shapes import ShapeImage
    from vrp.ingest.models import Adapter

EVAL_SEED_OFFSET = 900_001  # held-out images: seed + offset, never a training seed's stream
STATS_IMAGES = 512  # images used for the pixel mean/std and for the negative-sampling statistics
CARD_FILE = "card.json"
CHECKPOINT_FILE = "checkpoint.json"  # beside the weights while a run is in progress
VQA_TEMPLATE = DATASET_PROMPTS["shapes-vqa"]
VQA_RULE = "lenient"


@dataclass(frozen=True)
class ToyTrainConfig:
    """Everything that decides a toy model (recorded in its card)."""

    family: str
    seed: int = 0
    minutes: float | None = 15.0
    steps: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 50
    decay_share: float = 0.3
    decay_start: int | None = None
    caption_share: float = 0.25
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    image_size: int = 80
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    eval_images: int = 100
    evals: int = 5
    threads: int = 1
    vqa_share: float = 0.0
    init_from: str | None = None
    checkpoint_minutes: float = 5.0
    build_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        toys = registry.toy_families()
        if self.family not in toys:
            raise ValueError(f"unknown family {self.family!r}; expected one of {', '.join(toys)}")
        if self.steps is None and self.minutes is None:
            raise ValueError("give a number of steps or of minutes")
        if not 0 < self.decay_share < 1:
            raise ValueError("decay_share must be between 0 and 1")
        if not 0 <= self.vqa_share < 1:
            raise ValueError("vqa_share must be at least 0 and below 1")
        if self.warmup_steps < 1:
            raise ValueError("warmup_steps must be at least 1")
        if self.seed == DEFAULT_SEED:
            raise ValueError(
                f"seed {DEFAULT_SEED} is the default evaluation benchmark's; train on another seed"
            )

    @property
    def eval_seed(self) -> int:
        return self.seed + EVAL_SEED_OFFSET


@dataclass
class Batch:
    """One training batch: images, questions and the answer text each should be followed by."""

    images: list[Image.Image]
    questions: list[str]
    answers: list[str]


def pixel_stats(images: Sequence[Image.Image]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the images' pixels, on the 0-1 scale."""
    pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])
    flat = pixels.reshape(-1, 3)
    return flat.mean(axis=0).tolist(), flat.std(axis=0).tolist()


def make_batch(
    seed: int,
    step: int,
    batch_size: int,
    caption_share: float,
    frequency: np.ndarray,
    cooccurrence: np.ndarray,
    image_size: int,
    vqa_share: float = 0.0,
) -> Batch:
    """Training batch number ``step``: fresh images, an open question, a caption or a yes/no
    question for each.

    Yes and no are equally likely; a no question's object is chosen by one of POPE's three
    negative strategies at random, so the model sees random, popular and adversarial negatives.
    With ``vqa_share`` 0 the batches are exactly those of a POPE-only run (no extra draws).
    """
    rng = np.random.default_rng([seed, step, 77])
    batch = Batch([], [], [])
    for j in range(batch_size):
        shape = render_image(step * batch_size + j, seed, image_size=image_size)
        batch.images.append(shape.image)
        if vqa_share > 0 and rng.random() < vqa_share:
            options = image_questions(shape, seed)
            row = options[int(rng.integers(len(options)))]
            batch.questions.append(apply_template(VQA_TEMPLATE, row["question"]))
            batch.answers.append(taught_answer(row["multiple_choice_answer"]))
            continue
        if rng.random() < caption_share:
            batch.questions.append(CAPTION_QUESTION)
            batch.answers.append(caption_for(shape.present))
            continue
        if rng.random() < 0.5:
            cls = shape.present[int(rng.integers(len(shape.present)))]
            batch.answers.append("yes")
        else:
            split = SPLITS[int(rng.integers(len(SPLITS)))]
            cls = negatives(split, shape.present, 1, frequency, cooccurrence, rng)[0]
            batch.answers.append("no")
        batch.questions.append(question_for(CLASSES[cls].name))
    return batch


def taught_answer(answer: str) -> str:
    """The text taught for a shapes-VQA answer: the normalised answer with every small number as
    its word ("2" -> "two", "1 shape" -> "one shape": the toy tokenizer is word-level, and the VQA
    normalisation maps the words back to digits)."""
    words = normalise_vqa_answer(answer).split()
    return " ".join(NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in words)


def open_vocabulary() -> list[str]:
    """Every word of shapes-VQA's prompts and taught answers (short-answer instruction included)."""
    texts = [
        *(f"What color is the {shape}?" for shape in SHAPE_NAMES),
        *(f"{shape}s" for shape in SHAPE_NAMES),  # "squares": an annotator's plural can be the main answer
        "How many shapes are there?",
        "What shape is at the top?",
        CAPTION_QUESTION,
        VQA_TEMPLATE,
        *NUMBER_WORDS,
    ]
    words = set(vocabulary())
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", text.replace("{question}", "")))
    return sorted(words)


@dataclass(frozen=True)
class VocabularyGrowth:
    """Words added to a word-level tokenizer: ``tokens`` at ids ``at .. at + len(tokens) - 1``;
    every token that had an id at or above ``at`` (PaliGemma's ``<loc>``/``<seg>`` tokens) moved up
    by ``len(tokens)``."""

    tokens: tuple[str, ...]
    at: int


def extend_vocabulary(folder: Path, words: Sequence[str]) -> VocabularyGrowth:
    """Add the `words` (and their capitalised forms) that the word-level tokenizer in `folder`
    lacks, right after its word vocabulary; only ``tokenizer.json`` changes here, the model's
    matrices follow with :func:`grow_embeddings`.

    Why there and not after every token: ``tokenizers`` numbers the added tokens (PaliGemma's 1,152
    ``<loc>``/``<seg>`` tokens) from the end of the word vocabulary whenever it loads a file, so
    words appended behind them would collide with them after a reload. The added tokens move up
    instead, and :func:`grow_embeddings` moves their rows with them, so every token keeps its row.
    """
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = spec["model"]["vocab"]
    extra = spec.get("added_tokens", [])
    taken = set(vocab) | {t["content"] for t in extra}
    at = 1 + max(vocab.values())
    added: list[str] = []
    for word in words:
        for form in dict.fromkeys((word, word.capitalize())):
            if form not in taken:
                vocab[form] = at + len(added)
                taken.add(form)
                added.append(form)
    for token in extra:
        if token["id"] >= at:
            token["id"] += len(added)
    if added:
        path.write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return VocabularyGrowth(tuple(added), at)


@torch.no_grad()
def grow_embeddings(model: PreTrainedModel, growth: VocabularyGrowth, seed: int) -> int:
    """Give the input embeddings and the output layer rows for `growth`'s tokens, deterministically;
    returns the new vocabulary size.

    Rows from ``growth.at`` on move up with their tokens; each new row is the mean of the old rows
    plus seeded noise of 0.1 of their per-dimension spread, so a new word starts as an average word
    (no output preference) and new words differ from each other. Old tokens' logits do not change.
    """
    old = model.get_input_embeddings().weight.shape[0]
    count, at = len(growth.tokens), growth.at
    if count == 0:
        return old
    size = old + count
    generator = torch.Generator().manual_seed(seed)
    model.resize_token_embeddings(size, mean_resizing=False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "vocab_size"):
            config.vocab_size = size  # PaliGemma keeps a top-level copy that resizing leaves stale
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for weight in matrices:
        base = weight[:old].float().clone()
        noise = torch.randn((count, weight.shape[1]), generator=generator) * base.std(0) * 0.1
        weight[at + count :] = base[at:].to(weight.dtype)
        weight[at : at + count] = (base.mean(0) + noise).to(weight.dtype)
    bias = getattr(output, "bias", None) if output is not None else None
    if bias is not None:
        old_bias = bias[:old].clone()
        bias[at + count :] = old_bias[at:]
        bias[at : at + count] = old_bias.mean()
    return size


def _answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of an answer followed by the end token (so generation stops after it)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise ValueError(f"answer {answer!r} has words outside the toy tokenizer's vocabulary")
    return [*ids, int(tokenizer.eos_token_id)]


def with_answers(adapter: Adapter, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs with each row's answer appended after its prompt, and the next-token targets.

    The prompt is encoded by the adapter exactly as at inference (left padded); the answers are
    appended on the right (right padded, masked). ``targets[b, t]`` is the token that logits at
    position ``t`` must predict, -100 where nothing is taught.
    """
    enc = adapter.encode(batch.images, batch.questions)
    answers = [_answer_ids(adapter.tokenizer, a) for a in batch.answers]
    size, prompt_len = len(answers), enc.inputs["input_ids"].shape[1]
    width = max(len(a) for a in answers)
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
    extra = torch.full((size, width), int(pad), dtype=torch.long)
    extra_mask = torch.zeros((size, width), dtype=enc.inputs["attention_mask"].dtype)
    targets = torch.full((size, prompt_len + width), -100, dtype=torch.long)
    for row, ids in enumerate(answers):
        extra[row, : len(ids)] = torch.tensor(ids)
        extra_mask[row, : len(ids)] = 1
        # logits at the last prompt token predict the first answer token, and so on
        targets[row, prompt_len - 1 : prompt_len - 1 + len(ids)] = torch.tensor(ids)
    inputs = dict(enc.inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], extra_mask], dim=1)
    for key, fill in adapter.spec.generated_token_types.items():
        if key in inputs:
            # answers are generated tokens: PaliGemma's 1 keeps them out of the bidirectional prefix
            inputs[key] = torch.cat([inputs[key], torch.full_like(extra, fill)], dim=1)
    return inputs, targets


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the taught positions."""
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
    )


def lr_at(step: int, cfg: ToyTrainConfig, decay_start: int | None, total: int | None) -> float:
    """Warm-up, stable, decay: linear warm-up to ``lr``, constant until ``decay_start``, then
    cosine decay to ``min_lr_ratio * lr`` at step ``total``.

    Until a time-limited run fixes ``decay_start`` and ``total`` (None), the rate depends on the
    step alone, so a rerun with the card's recorded numbers reproduces every step exactly."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if decay_start is None or total is None or step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(
    adapter: Adapter, images: Sequence[ShapeImage], seed: int, *, batch_size: int = 64
) -> dict[str, float]:
    """Held-out accuracy per split: the answer is yes when p(yes) > p(no) at the answer position
    (each summed over the tokenizer's yes/no variants), as VRP's first-token statistics define it."""
    model = adapter.model
    was_training = model.training
    model.eval()
    by_name = {im.name: im.image for im in images}
    accuracy: dict[str, float] = {}
    yes_ids = torch.tensor(yes_no_ids(adapter)[0])
    no_ids = torch.tensor(yes_no_ids(adapter)[1])
    for split in SPLITS:
        rows = make_questions(images, split, seed)
        correct = 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            enc = adapter.encode([by_name[r["image"]] for r in chunk], [r["text"] for r in chunk])
            logits = model(**enc.inputs).logits[torch.arange(len(chunk)), enc.answer_pos].float()
            margin = logits[:, yes_ids].logsumexp(-1) - logits[:, no_ids].logsumexp(-1)
            said_yes = (margin > 0).tolist()
            correct += sum(int(yes == (r["label"] == "yes")) for yes, r in zip(said_yes, chunk, strict=True))
        accuracy[split] = correct / len(rows)
    model.train(was_training)
    return accuracy


@torch.no_grad()
def evaluate_vqa(
    adapter: Adapter,
    images: Sequence[ShapeImage],
    seed: int,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    blank: bool = False,
) -> dict[str, Any]:
    """Held-out shapes-VQA accuracy (lenient, against ``multiple_choice_answer``) overall and per
    question type, next to each type's majority-answer baseline: the accuracy of always giving the
    type's most frequent ``multiple_choice_answer``. Greedy answers of up to ``max_new_tokens``, as
    ``vrp ingest run`` decodes them. ``blank`` replaces every image by a plain grey one of its size."""
    from collections import Counter

    model = adapter.model
    was_training = model.training
    model.eval()
    rows = [(im, row) for im in images for row in image_questions(im, seed)]
    correct: list[bool] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pictures = [_blank(im.image) if blank else im.image for im, _ in chunk]
        enc = adapter.encode(pictures, [apply_template(VQA_TEMPLATE, r["question"]) for _, r in chunk])
        out = model.generate(
            **enc.inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )
        texts = adapter.tokenizer.batch_decode(
            out[:, enc.inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for text, (_, r) in zip(texts, chunk, strict=True):
            answer = normalise_vqa_answer(text.split("\n", 1)[0])
            correct.append(is_correct(VQA_RULE, answer, r["multiple_choice_answer"], 0.0))
    model.train(was_training)
    by_type: dict[str, Any] = {}
    for qtype in sorted({r["question_type"] for _, r in rows}):
        idx = [i for i, (_, r) in enumerate(rows) if r["question_type"] == qtype]
        golds = [rows[i][1]["multiple_choice_answer"] for i in idx]
        majority = Counter(golds).most_common(1)[0][0]
        by_type[qtype] = {
            "questions": len(idx),
            "accuracy": sum(correct[i] for i in idx) / len(idx),
            "majority_answer": majority,
            "majority_baseline": sum(is_correct(VQA_RULE, majority, g, 0.0) for g in golds) / len(idx),
        }
    return {"questions": len(rows), "accuracy": sum(correct) / max(1, len(rows)), "by_type": by_type}


def _blank(image: Image.Image) -> Image.Image:
    """A plain mid-grey image of the same size: the toys' 'no visual evidence' control."""
    return Image.new("RGB", image.size, (128, 128, 128))


def _build_kwargs(cfg: ToyTrainConfig, mean: list[float], std: list[float]) -> dict[str, Any]:
    """``build_tiny`` arguments: the toy size, the shapes-POPE vocabulary and the data's pixel stats."""
    kwargs: dict[str, Any] = dict(
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vocab_words=vocabulary(),
        vision_hidden_size=cfg.vision_hidden_size,
        vision_layers=cfg.vision_layers,
        vision_heads=cfg.vision_heads,
        image_mean=mean,
        image_std=std,
    )
    toy = registry.family(cfg.family).toy
    kwargs.update(toy.build_overrides if toy is not None else {})
    kwargs.update(cfg.build_overrides)
    return kwargs


def train_toy(
    cfg: ToyTrainConfig,
    out_dir: str | Path,
    *,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Build, train, evaluate and save one toy model into ``out_dir``; returns its card.

    ``out_dir`` ends up as a normal checkpoint folder (safetensors weights, config, processor and
    tokenizer files, loadable with ``load_adapter``) plus ``card.json``. ``log`` receives one line
    per evaluation; ``progress`` shows a progress bar (default: when stderr is a terminal).
    """
    from tqdm import tqdm

    from vrp.ingest.models import load_adapter
    from vrp.ingest.models.tiny import build_tiny

    say = log or (lambda _line: None)
    out = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    reference = render_images(STATS_IMAGES, cfg.seed, image_size=cfg.image_size)
    frequency, cooccurrence = class_statistics([im.present for im in reference])
    growth = VocabularyGrowth((), 0)
    if cfg.init_from is None:
        mean, std = pixel_stats([im.image for im in reference])
        build_tiny(cfg.family, out, **_build_kwargs(cfg, mean, std))
    else:
        mean, std = _copy_toy(Path(cfg.init_from), out, cfg.family)
    if cfg.vqa_share > 0:
        growth = extend_vocabulary(out, open_vocabulary())
    adapter = load_adapter(str(out))
    model = adapter.model
    grow_embeddings(model, growth, cfg.seed)
    model.train()
    eval_images = render_images(cfg.eval_images, cfg.eval_seed, image_size=cfg.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step_once(step: int, decay_start: int | None, total: int | None) -> float:
        batch = make_batch(
            cfg.seed,
            step,
            cfg.batch_size,
            cfg.caption_share,
            frequency,
            cooccurrence,
            cfg.image_size,
            cfg.vqa_share,
        )
        inputs, targets = with_answers(adapter, batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, decay_start, total)
        loss = answer_loss(model(**inputs).logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{cfg.family}: training loss is not finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    losses: list[float] = []
    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    def evaluate_now(step: int, images: Sequence[ShapeImage]) -> dict[str, float]:
        acc = evaluate(adapter, images, cfg.eval_seed)
        entry: dict[str, Any] = {
            "step": step,
            "seconds": round(time.perf_counter() - started, 1),
            "loss": round(float(np.mean(losses[-50:])), 4),
            "images": len(images),
            "accuracy": acc,
        }
        accs = " ".join(f"{s} {a:.3f}" for s, a in acc.items())
        if cfg.vqa_share > 0:
            vqa = evaluate_vqa(adapter, images, cfg.eval_seed)
            entry["vqa"] = vqa
            vqa_line = " ".join(f"{t}:{v['accuracy']:.2f}" for t, v in vqa["by_type"].items())
            accs += f" | vqa {vqa['accuracy']:.3f} ({vqa_line})"
        history.append(entry)
        say(f"{cfg.family} step {step} loss {entry['loss']:.3f} {accs} ({entry['seconds']:.0f}s)")
        return acc

    last_checkpoint = time.perf_counter()

    def checkpoint(step: int) -> None:
        """Weights and progress so far, so that a run cut short leaves a usable (undecayed) model."""
        model.eval()
        model.save_pretrained(out)
        model.train()
        state = {"step": step, "seconds": round(time.perf_counter() - started, 1), "history": history}
        state["loss"] = round(float(np.mean(losses[-50:])), 4)
        (out / CHECKPOINT_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    # Steps mode: everything is known. Minutes mode: train at the stable rate until the decay share
    # of the budget is left, then fix the remaining step count from the measured pace (evaluations
    # included) and decay over it; both numbers go into the card.
    total = cfg.steps
    decay_start = (
        cfg.decay_start
        if cfg.decay_start is not None
        else (None if total is None else round(total * (1 - cfg.decay_share)))
    )
    budget = None if cfg.minutes is None else cfg.minutes * 60
    interim = eval_images[: max(4, len(eval_images) // 3)]
    next_eval = 1
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, desc=f"toy {cfg.family}", disable=not show)
    step = 0
    while total is None or step < total:
        losses.append(step_once(step, decay_start, total))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        elapsed = time.perf_counter() - started
        if total is None and budget is not None and elapsed >= budget * (1 - cfg.decay_share):
            decay_start = step
            total = step + max(1, int((budget - elapsed) / (elapsed / step)))
            bar.total = total
            say(f"{cfg.family}: {elapsed / step:.2f} s/step so far; decaying over steps {step}..{total}")
        due = (
            step * cfg.evals >= next_eval * total
            if total is not None
            else (budget is not None and elapsed * cfg.evals >= next_eval * budget)
        )
        if due and step != total:
            evaluate_now(step, interim)
            next_eval += 1
        if time.perf_counter() - last_checkpoint >= cfg.checkpoint_minutes * 60 and step != total:
            checkpoint(step)
            last_checkpoint = time.perf_counter()
    bar.close()
    final = evaluate_now(step, eval_images)
    wall = time.perf_counter() - started
    model.eval()
    model.save_pretrained(out)
    questions = {s: len(make_questions(eval_images, s, cfg.eval_seed)) for s in SPLITS}
    card = _card(cfg, adapter, (step, decay_start), wall, (mean, std), history, losses, questions, final)
    if cfg.vqa_share > 0:
        card["evaluation"]["vqa"] = {
            "dataset": "shapes-vqa",
            "prompt": VQA_TEMPLATE,
            "rule": f"{VQA_RULE} against multiple_choice_answer, greedy answer of up to 8 tokens",
            **history[-1]["vqa"],
        }
        card["training"]["data"] = (
            f"shapes-pope and shapes-vqa (share {cfg.vqa_share}) rendered in memory from the training seed"
        )
    if growth.tokens:
        card["training"]["added_tokens"] = list(growth.tokens)
        card["training"]["added_tokens_at"] = growth.at
    if cfg.init_from is not None:
        card["training"]["init"] = _source_summary(Path(cfg.init_from))
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return card


def _copy_toy(source: Path, out: Path, family: str) -> tuple[list[float], list[float]]:
    """Copy a trained toy's checkpoint files into `out` (its card stays behind; the new run writes
    its own); returns the pixel mean/std its image processor normalises with."""
    card_path = source / CARD_FILE
    if not card_path.is_file():
        raise ValueError(f"{source} has no {CARD_FILE}; --init-from takes a trained toy's folder")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if card.get("family") != family:
        raise ValueError(f"{source} is a {card.get('family')} toy, not {family}; pass the matching --family")
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in (CARD_FILE, CHECKPOINT_FILE):
            shutil.copy2(item, out / item.name)
    return list(card["training"]["pixel_mean"]), list(card["training"]["pixel_std"])


def _source_summary(source: Path) -> dict[str, Any]:
    """What a warm start began from: the source toy's training recipe and held-out accuracy."""
    card = json.loads((source / CARD_FILE).read_text(encoding="utf-8"))
    keep = ("seed", "steps", "decay_start", "minutes", "batch_size", "lr", "data")
    return {
        "from": card["name"],
        "training": {k: card["training"].get(k) for k in keep},
        "accuracy": card["evaluation"]["accuracy"],
        "evaluation_seed": card["evaluation"]["seed"],
    }


def _card(
    cfg: ToyTrainConfig,
    adapter: Adapter,
    steps: tuple[int, int | None],
    wall: float,
    pixels: tuple[list[float], list[float]],
    history: list[dict[str, Any]],
    losses: list[float],
    questions: dict[str, int],
    accuracy: dict[str, float],
) -> dict[str, Any]:
    """The toy's card: what it is, how it was trained, and how well it answers held-out questions."""
    import transformers

    model = adapter.model
    return {
        "name": registry.toy_name(cfg.family),
        "family": cfg.family,
        "model_class": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "config": {
            "hidden_size": adapter.hidden_size,
            "num_layers": adapter.num_layers,
            "num_heads": adapter.num_heads,
            "num_kv_heads": adapter.num_kv_heads,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        },
        "training": {
            **{k: v for k, v in asdict(cfg).items() if k != "family"},
            "data": "shapes-pope rendered in memory from the training seed",
            "steps": steps[0],
            "decay_start": steps[1],
            "minutes": round(wall / 60, 2),
            "final_loss": round(float(np.mean(losses[-50:])), 4),
            "pixel_mean": pixels[0],
            "pixel_std": pixels[1],
        },
        "evaluation": {
            "dataset": "shapes-pope",
            "seed": cfg.eval_seed,
            "images": cfg.eval_images,
            "questions": questions,
            "accuracy": accuracy,
            "rule": "yes when p(yes) > p(no) at the answer position",
        },
        "history": history,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
