"""shapes-POPE: a procedural POPE benchmark of coloured shapes, deterministic by seed.

Each image holds 1-4 objects of ten classes (shape x colour, e.g. "red circle") on a plain or
lightly noisy background. Classes belong to *scenes* whose members tend to appear together, and
some scenes and classes are more frequent than others, so POPE's three negative-sampling
strategies mean what they mean on COCO:

- ``random``: any absent class;
- ``popular``: the absent classes that are most frequent in the whole set;
- ``adversarial``: the absent classes that co-occur most often with the classes present.

Frequencies and co-occurrences are counted on the generated images themselves, as POPE counts
them on COCO's annotations. Some classes are deliberately close in colour (red/orange,
blue/purple) and every object's colour is its class's base colour plus jitter, so the task needs
the image and not only the question.

``generate_shapes_pope(out_dir, images=N, seed=S)`` writes ``random.jsonl``, ``popular.jsonl``,
``adversarial.jsonl`` (POPE's format, read by ``load_pope`` unchanged), ``images/*.png`` and
``boxes.json`` (per image: its objects with class and box). :func:`render_images` and
:func:`make_questions` give the same data in memory (the toy trainer uses them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vrp.ingest.datasets.pope import SPLITS

GENERATOR_VERSION = 1
DEFAULT_IMAGE_SIZE = 80
DEFAULT_SEED = 1234  # the default benchmark's seed; training sets must use other seeds
DEFAULT_IMAGES = 100
DEFAULT_MAX_PAIRS = 3
IMAGE_PREFIX = "shapes_"


@dataclass(frozen=True)
class ShapeClass:
    """One object class: a shape drawn in a base colour, belonging to one scene."""

    name: str
    shape: str
    colour: tuple[int, int, int]
    scene: str
    weight: float  # relative frequency inside its scene


RED, ORANGE, YELLOW = (205, 40, 40), (225, 105, 30), (220, 200, 40)
GREEN, BLUE, PURPLE = (40, 160, 60), (45, 75, 210), (125, 55, 185)

CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("red circle", "circle", RED, "warm", 4.0),
    ShapeClass("orange circle", "circle", ORANGE, "warm", 3.0),
    ShapeClass("yellow square", "square", YELLOW, "warm", 2.0),
    ShapeClass("red triangle", "triangle", RED, "warm", 1.5),
    ShapeClass("blue square", "square", BLUE, "cool", 4.0),
    ShapeClass("purple square", "square", PURPLE, "cool", 2.5),
    ShapeClass("blue diamond", "diamond", BLUE, "cool", 1.5),
    ShapeClass("green triangle", "triangle", GREEN, "garden", 3.0),
    ShapeClass("green circle", "circle", GREEN, "garden", 2.0),
    ShapeClass("yellow diamond", "diamond", YELLOW, "garden", 1.5),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
SCENE_PROBS: dict[str, float] = {"warm": 0.45, "cool": 0.33, "garden": 0.22}
IN_SCENE = 0.85  # share of an image's objects drawn from its scene (the rest from any class)
QUESTION_TEMPLATE = "Is there {article} {object} in the image?"


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its class index and box ``(x0, y0, x1, y1)``, x1/y1 exclusive, in pixels."""

    cls: int
    bbox: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return CLASSES[self.cls].name


@dataclass(frozen=True)
class ShapeImage:
    """One generated image with its objects (distinct classes) and the scene it was drawn from."""

    index: int
    name: str
    image: Image.Image
    objects: tuple[ShapeObject, ...]
    scene: str

    @property
    def present(self) -> tuple[int, ...]:
        return tuple(o.cls for o in self.objects)


def question_for(object_name: str) -> str:
    """The POPE question about one class ("Is there an orange circle in the image?")."""
    article = "an" if object_name[0] in "aeiou" else "a"
    return QUESTION_TEMPLATE.format(article=article, object=object_name)


CAPTION_QUESTION = "What is in the image?"


def caption_for(classes: Sequence[int]) -> str:
    """The answer to :data:`CAPTION_QUESTION`: the objects present, in class order ("red circle and
    blue square"); the toy trainer's auxiliary task."""
    return " and ".join(CLASSES[c].name for c in sorted(set(classes)))


def vocabulary() -> list[str]:
    """Every word and punctuation token of shapes-POPE questions, answers and captions (for
    word-level tokenizers), in sorted order."""
    texts = [question_for(name) for name in CLASS_NAMES] + [
        CAPTION_QUESTION,
        caption_for(range(len(CLASSES))),
    ]
    words = {"yes", "no", "Yes", "No"}
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", text))
    return sorted(words)


def _class_probs(scene: str) -> np.ndarray:
    """Probability of each class for one object of an image of ``scene``."""
    base = np.array([c.weight for c in CLASSES])
    in_scene = np.array([c.weight if c.scene == scene else 0.0 for c in CLASSES])
    probs = IN_SCENE * in_scene / in_scene.sum() + (1 - IN_SCENE) * base / base.sum()
    return probs / probs.sum()


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]
) -> None:
    x0, y0, x1, y1 = box
    right, bottom = x1 - 1, y1 - 1
    cx, cy = (x0 + right) / 2, (y0 + bottom) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(
    rng: np.random.Generator, size: int, taken: list[tuple[int, int, int, int]], min_side: int, max_side: int
) -> tuple[int, int, int, int]:
    """A box that does not touch the ones already placed (objects stay fully visible)."""
    side_high = max_side
    while True:
        for _ in range(60):
            side = int(rng.integers(min_side, side_high + 1))
            x0 = int(rng.integers(0, size - side + 1))
            y0 = int(rng.integers(0, size - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[0] >= t[2] + 2 or t[0] >= box[2] + 2 or box[1] >= t[3] + 2 or t[1] >= box[3] + 2
                for t in taken
            ):
                return box
        if side_high <= min_side // 2:
            raise RuntimeError("cannot place objects without overlap; use a larger image size")
        side_high = max(min_side // 2, int(side_high * 0.8))
        min_side = min(min_side, side_high)


def render_image(
    index: int, seed: int, *, image_size: int = DEFAULT_IMAGE_SIZE, jitter: int = 18, noise: float = 5.0
) -> ShapeImage:
    """Image number ``index`` of the set with ``seed`` (independent of how many images the set has)."""
    rng = np.random.default_rng([seed, index])
    scenes = list(SCENE_PROBS)
    scene = scenes[int(rng.choice(len(scenes), p=np.array([SCENE_PROBS[s] for s in scenes])))]
    count = int(rng.integers(1, 5))
    classes = rng.choice(len(CLASSES), size=count, replace=False, p=_class_probs(scene))

    tint = rng.integers(-10, 11, size=3)
    grey = int(rng.integers(200, 236))
    background = np.clip(grey + tint, 0, 255).astype(np.float64)
    pixels = np.broadcast_to(background, (image_size, image_size, 3)).copy()
    if rng.random() < 0.5:  # half the backgrounds plain, half lightly noisy
        pixels += rng.normal(0.0, noise, size=pixels.shape)
    canvas = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)

    min_side, max_side = max(6, round(image_size * 0.18)), max(8, round(image_size * 0.34))
    taken: list[tuple[int, int, int, int]] = []
    objects = []
    for cls in classes:
        box = _place(rng, image_size, taken, min_side, max_side)
        taken.append(box)
        colour = np.clip(
            np.array(CLASSES[int(cls)].colour) + rng.integers(-jitter, jitter + 1, size=3), 0, 255
        )
        _draw(draw, CLASSES[int(cls)].shape, box, tuple(int(v) for v in colour))
        objects.append(ShapeObject(int(cls), box))
    return ShapeImage(index, f"{IMAGE_PREFIX}{index:06d}.png", canvas, tuple(objects), scene)


def render_images(
    count: int, seed: int, *, image_size: int = DEFAULT_IMAGE_SIZE, start: int = 0
) -> list[ShapeImage]:
    """Images ``start .. start + count - 1`` of the set with ``seed``."""
    return [render_image(i, seed, image_size=image_size) for i in range(start, start + count)]


def class_statistics(present: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(frequency, co-occurrence): images containing each class, and each pair of classes."""
    n = len(CLASSES)
    frequency = np.zeros(n, dtype=np.int64)
    cooccurrence = np.zeros((n, n), dtype=np.int64)
    for classes in present:
        unique = sorted(set(classes))
        frequency[unique] += 1
        for a in unique:
            for b in unique:
                if a != b:
                    cooccurrence[a, b] += 1
    return frequency, cooccurrence


def negatives(
    split: str,
    present: Sequence[int],
    count: int,
    frequency: np.ndarray,
    cooccurrence: np.ndarray,
    rng: np.random.Generator,
) -> list[int]:
    """``count`` absent classes chosen by POPE's strategy for ``split`` (ties: more frequent, then
    lower class index)."""
    absent = [c for c in range(len(CLASSES)) if c not in set(present)]
    if split == "random":
        return [absent[i] for i in rng.choice(len(absent), size=count, replace=False)]
    if split == "popular":
        return sorted(absent, key=lambda c: (-frequency[c], c))[:count]
    if split == "adversarial":
        score = {c: int(cooccurrence[list(present), c].sum()) for c in absent}
        return sorted(absent, key=lambda c: (-score[c], -frequency[c], c))[:count]
    raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def make_questions(
    images: Sequence[ShapeImage], split: str, seed: int, *, max_pairs: int = DEFAULT_MAX_PAIRS
) -> list[dict]:
    """POPE rows for one split: per image, min(objects, max_pairs) yes questions about present
    classes and as many no questions, alternating yes/no, question ids 1..n.

    The yes questions are the same in every split (as in POPE); only the negatives differ.
    """
    frequency, cooccurrence = class_statistics([im.present for im in images])
    split_index = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    rows: list[dict] = []
    for im in images:
        pairs = min(len(im.present), max_pairs)
        pick_rng = np.random.default_rng([seed, im.index, 1000])
        positives = [
            im.present[i] for i in sorted(pick_rng.choice(len(im.present), size=pairs, replace=False))
        ]
        neg_rng = np.random.default_rng([seed, im.index, 2000 + split_index])
        absent = negatives(split, im.present, pairs, frequency, cooccurrence, neg_rng)
        for yes_cls, no_cls in zip(positives, absent, strict=True):
            for cls, label in ((yes_cls, "yes"), (no_cls, "no")):
                rows.append(
                    {
                        "question_id": len(rows) + 1,
                        "image": im.name,
                        "text": question_for(CLASSES[cls].name),
                        "label": label,
                    }
                )
    return rows


def _png_bytes(image: Image.Image) -> bytes:
    """PNG with fixed settings and no metadata, so the same pixels always give the same bytes."""
    buffer = BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def is_shapes_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a complete shapes-POPE folder (boxes.json is written last)."""
    path = Path(path)
    return (path / "boxes.json").is_file() and all((path / f"{s}.jsonl").is_file() for s in SPLITS)


def _write(out_dir: Path, images: Sequence[ShapeImage], seed: int, image_size: int, max_pairs: int) -> None:
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for im in images:
        (out_dir / "images" / im.name).write_bytes(_png_bytes(im.image))
    for split in SPLITS:
        rows = make_questions(images, split, seed, max_pairs=max_pairs)
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        (out_dir / f"{split}.jsonl").write_text(text, encoding="utf-8")
    boxes = {
        "generator": {
            "name": "shapes-pope",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "images": len(images),
            "image_size": image_size,
            "max_pairs": max_pairs,
        },
        "classes": [
            {"name": c.name, "shape": c.shape, "colour": list(c.colour), "scene": c.scene} for c in CLASSES
        ],
        "images": {
            im.name: {
                "scene": im.scene,
                "objects": [{"class": o.name, "bbox": list(o.bbox)} for o in im.objects],
            }
            for im in images
        },
    }
    (out_dir / "boxes.json").write_text(json.dumps(boxes, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def generate_shapes_pope(
    out_dir: str | Path,
    *,
    images: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    replace: bool = True,
) -> Path:
    """Write a shapes-POPE folder; the same arguments always give the same bytes in every file.

    The folder is built beside ``out_dir`` and moved into place at the end, so a reader never
    sees a half-written set. An existing shapes-POPE folder is replaced (with ``replace=False``
    the final move fails with ``OSError`` instead); any other non-empty folder is refused rather
    than overwritten.
    """
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not is_shapes_dir(out):
        raise FileExistsError(f"{out} is not empty and is not a shapes-POPE folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    rendered = render_images(images, seed, image_size=image_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(staging, rendered, seed, image_size, max_pairs)
        if replace and out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
        os.replace(staging, out)  # also onto an empty folder; fails if another writer got there first
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def default_cache_dir() -> Path:
    """Where generated datasets are cached: $VRP_CACHE_DIR, else $XDG_CACHE_HOME/vrp, else ~/.cache/vrp."""
    if os.environ.get("VRP_CACHE_DIR"):
        return Path(os.environ["VRP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vrp"


def default_shapes_dir() -> Path:
    """The folder of the default shapes-POPE benchmark (fixed seed, distinct from training seeds)."""
    return default_cache_dir() / (
        f"shapes-pope-v{GENERATOR_VERSION}-seed{DEFAULT_SEED}-n{DEFAULT_IMAGES}-{DEFAULT_IMAGE_SIZE}px"
    )


def ensure_shapes_dir(data_dir: str | Path | None = None) -> Path:
    """A complete shapes-POPE folder: ``data_dir`` if it already is one, else the default set
    generated into ``data_dir`` (or the user cache when ``data_dir`` is None).

    Two processes asking at once both generate; the second one's move fails because the folder is
    no longer empty, and it then uses the (identical) set the first one wrote.
    """
    folder = Path(data_dir) if data_dir is not None else default_shapes_dir()
    if is_shapes_dir(folder):
        return folder
    try:
        generate_shapes_pope(folder, images=DEFAULT_IMAGES, seed=DEFAULT_SEED, replace=False)
    except OSError:
        if not is_shapes_dir(folder):
            raise
    return folder
