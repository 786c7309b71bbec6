"""shapes-VQA: open questions about the shapes-POPE images, in the VQAv2 file layout.

Each image (the same renderer and seed rules as shapes-POPE) gets up to five questions of five
question types, with VQAv2's answer types:

- "What color is the {shape}?" (``what color is the``, ``other``), for a shape drawn once;
- "How many shapes are there?" (``how many``, ``number``);
- "What shape is at the top?" (``what shape is``, ``other``), when one object is clearly highest;
- "What is in the image?" (``what is in the``, ``other``), answered with the objects present;
- "Is there a {object} in the image?" (``is there a``, ``yes/no``).

Ten human answers per question vary the way annotators' do: spelling ("2", "two", "2 shapes"),
articles and case, and now and then a wrong one (a neighbouring count, a close colour). The
``multiple_choice_answer`` is the most frequent normalised answer, as in VQAv2.

Written as ``shapes_vqa_questions.json`` / ``shapes_vqa_annotations.json`` (the official JSON
pair, ``data_subtype`` "val") and ``images/COCO_val_<image_id:012d>.jpg``, so ``load_vqav2``
reads it unchanged; the same arguments always give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vrp.ingest.datasets.shapes import (
    CLASSES,
    DEFAULT_IMAGE_SIZE,
    ShapeImage,
    default_cache_dir,
    question_for,
    render_images,
)
from vrp.ingest.datasets.vqav2 import image_name
from vrp.tasks.vqa import normalise_vqa_answer

GENERATOR_VERSION = 1
DEFAULT_SEED = 4321  # distinct from shapes-POPE's and from the toys' training seeds
DEFAULT_IMAGES = 60
SUBTYPE = "val"
QUESTIONS_FILE = "shapes_vqa_questions.json"
ANNOTATIONS_FILE = "shapes_vqa_annotations.json"  # written last: its presence marks a complete set
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
CLOSE_COLOURS = {
    "red": "orange",
    "orange": "red",
    "blue": "purple",
    "purple": "blue",
    "yellow": "orange",
    "green": "yellow",
}
SHAPE_NAMES = ("circle", "square", "triangle", "diamond")


def _pick(rng: np.random.Generator, options: list[str], weights: list[float]) -> str:
    p = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _ten(rng: np.random.Generator, options: list[str], weights: list[float]) -> list[str]:
    return [_pick(rng, options, weights) for _ in range(10)]


def _colour_of(name: str) -> str:
    return name.split()[0]


def _questions(im: ShapeImage, rng: np.random.Generator) -> list[dict[str, Any]]:
    """(question, question_type, answer_type, ten answers) for one image."""
    out = []
    shapes = [CLASSES[o.cls].shape for o in im.objects]
    once = [o for o in im.objects if shapes.count(CLASSES[o.cls].shape) == 1]
    if once:
        obj = once[int(rng.integers(len(once)))]
        colour, shape = _colour_of(obj.name), CLASSES[obj.cls].shape
        answers = _ten(rng, [colour, colour.capitalize(), f"{colour}.", CLOSE_COLOURS[colour]], [5, 2, 1, 1])
        out.append((f"What color is the {shape}?", "what color is the", "other", answers))
    n = len(im.objects)
    wrong = [str(n + 1), str(n - 1 if n > 1 else n + 2)]
    answers = _ten(
        rng, [str(n), NUMBER_WORDS[n], f"{n} shape{'s' if n > 1 else ''}", *wrong], [5, 2.5, 1.5, 0.5, 0.5]
    )
    out.append(("How many shapes are there?", "how many", "number", answers))
    tops = sorted(im.objects, key=lambda o: (o.bbox[1] + o.bbox[3]) / 2)
    if (
        len(tops) == 1
        or (tops[1].bbox[1] + tops[1].bbox[3]) / 2 - (tops[0].bbox[1] + tops[0].bbox[3]) / 2 > 6
    ):
        shape = CLASSES[tops[0].cls].shape
        answers = _ten(
            rng, [shape, f"a {shape}", f"{_colour_of(tops[0].name)} {shape}", f"{shape}s"], [5, 2, 2, 1]
        )
        out.append(("What shape is at the top?", "what shape is", "other", answers))
    names = [CLASSES[c].name for c in sorted(im.present)]
    caption = " and ".join(names)
    answers = _ten(rng, [caption, names[0], "shapes", ", ".join(names)], [4, 2, 2, 2])
    out.append(("What is in the image?", "what is in the", "other", answers))
    absent = [i for i in range(len(CLASSES)) if i not in im.present]
    if absent and rng.random() < 0.5:
        cls, label = absent[int(rng.integers(len(absent)))], "no"
    else:
        cls, label = im.present[int(rng.integers(len(im.present)))], "yes"
    flip = "no" if label == "yes" else "yes"
    answers = _ten(rng, [label, label.capitalize(), flip], [7, 2, 1])
    out.append((question_for(CLASSES[cls].name), "is there a", "yes/no", answers))
    return out


def _most_common(answers: list[str]) -> str:
    counts = Counter(normalise_vqa_answer(a) for a in answers)
    top = max(counts.values())
    return next(normalise_vqa_answer(a) for a in answers if counts[normalise_vqa_answer(a)] == top)


def image_questions(im: ShapeImage, seed: int) -> list[dict[str, Any]]:
    """The shapes-VQA questions of one image of the set with ``seed``, as the written files hold them
    (question, question_type, answer_type, the ten answers and ``multiple_choice_answer``); the toy
    trainer draws its open questions from here, so training and benchmark share one generator."""
    rng = np.random.default_rng([seed, im.index, 7])
    return [
        {
            "question": question,
            "question_type": qtype,
            "answer_type": atype,
            "answers": answers,
            "multiple_choice_answer": _most_common(answers),
        }
        for question, qtype, atype, answers in _questions(im, rng)
    ]


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0, optimize=False)
    return buffer.getvalue()


def _write(out: Path, images: list[ShapeImage], seed: int, image_size: int) -> tuple[int, int]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for im in images:
        image_id = im.index + 1
        (out / "images" / image_name(SUBTYPE, image_id)).write_bytes(_jpeg_bytes(im.image))
        for k, row in enumerate(image_questions(im, seed)):
            question_id = image_id * 10 + k
            questions.append({"image_id": image_id, "question": row["question"], "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": row["question_type"],
                    "answer_type": row["answer_type"],
                    "multiple_choice_answer": row["multiple_choice_answer"],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(row["answers"])
                    ],
                }
            )
    info = {"description": "shapes-VQA", "version": GENERATOR_VERSION, "seed": seed, "image_size": image_size}
    header = {"info": info, "data_type": "shapes", "data_subtype": SUBTYPE, "task_type": "Open-Ended"}
    (out / QUESTIONS_FILE).write_text(json.dumps({**header, "questions": questions}, indent=1) + "\n")
    (out / ANNOTATIONS_FILE).write_text(json.dumps({**header, "annotations": annotations}, indent=1) + "\n")
    return len(images), len(questions)


def is_shapes_vqa_dir(path: str | Path) -> bool:
    """Whether `path` holds a complete shapes-VQA folder."""
    return (Path(path) / ANNOTATIONS_FILE).is_file() and (Path(path) / QUESTIONS_FILE).is_file()


def generate_shapes_vqa(
    out_dir: str | Path, *, images: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE, replace: bool = True
) -> Path:
    """Write a shapes-VQA folder (built beside `out_dir`, moved into place at the end).

    An existing shapes-VQA folder is replaced (``replace=False``: the move fails with ``OSError``);
    any other non-empty folder is refused.
    """
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not is_shapes_vqa_dir(out):
        raise FileExistsError(f"{out} is not empty and is not a shapes-VQA folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    rendered = render_images(images, seed, image_size=image_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(staging, rendered, seed, image_size)
        if replace and out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def default_shapes_vqa_dir() -> Path:
    """The folder of the default shapes-VQA set in the user cache."""
    return default_cache_dir() / (
        f"shapes-vqa-v{GENERATOR_VERSION}-seed{DEFAULT_SEED}-n{DEFAULT_IMAGES}-{DEFAULT_IMAGE_SIZE}px"
    )


def ensure_shapes_vqa_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir` if it is a shapes-VQA folder, else the default set generated there (or in the cache)."""
    folder = Path(data_dir) if data_dir is not None else default_shapes_vqa_dir()
    if is_shapes_vqa_dir(folder):
        return folder
    try:
        generate_shapes_vqa(folder, images=DEFAULT_IMAGES, seed=DEFAULT_SEED, replace=False)
    except OSError:
        if not is_shapes_vqa_dir(folder):
            raise
    return folder
