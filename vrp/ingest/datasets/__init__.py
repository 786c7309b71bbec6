"""Datasets VRP runs over: POPE files and the synthetic shapes-POPE benchmark, one format for both.

- ``load_dataset("pope", pope_file=..., image_dir=...)`` or ``load_dataset("shapes-pope")``
  -> ``(samples, errors)``: validated :class:`Sample` rows, and a :class:`SampleError` for every
  row that must be recorded and reported but never scored.
- ``load_image(sample)`` -> RGB ``PIL.Image`` (or :class:`SampleLoadError`).
- ``generate_shapes_pope(out_dir, images=N, seed=S)`` writes a shapes-POPE folder.
- ``dataset_fingerprint(samples)`` -> a hash for the run config (it changes with any question,
  label or image byte).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from vrp.ingest.datasets.pope import (
    SPLITS,
    PopeFormatError,
    Sample,
    SampleError,
    SampleLoadError,
    dataset_fingerprint,
    infer_split,
    load_image,
    load_pope,
    parse_object,
)
from vrp.ingest.datasets.shapes import (
    DEFAULT_SEED,
    default_shapes_dir,
    ensure_shapes_dir,
    generate_shapes_pope,
)
from vrp.ingest.datasets.shapes_vqa import (
    ANNOTATIONS_FILE,
    QUESTIONS_FILE,
    ensure_shapes_vqa_dir,
    generate_shapes_vqa,
)
from vrp.ingest.datasets.vqav2 import (
    VqaFormatError,
    load_vqav2,
    load_vqav2_parquet,
    read_question_ids,
    stratified_sample,
)

DATASETS: tuple[str, ...] = ("pope", "shapes-pope", "vqav2", "shapes-vqa")
#: which answer task (``vrp.tasks``) scores each dataset
DATASET_TASKS: dict[str, str] = {
    "pope": "yesno",
    "shapes-pope": "yesno",
    "vqav2": "open",
    "shapes-vqa": "open",
}

__all__ = [
    "DATASETS",
    "DATASET_TASKS",
    "DEFAULT_SEED",
    "SPLITS",
    "PopeFormatError",
    "Sample",
    "SampleError",
    "SampleLoadError",
    "dataset_fingerprint",
    "dataset_task",
    "default_shapes_dir",
    "generate_shapes_pope",
    "generate_shapes_vqa",
    "load_vqav2",
    "load_vqav2_parquet",
    "read_question_ids",
    "stratified_sample",
    "VqaFormatError",
    "infer_split",
    "load_dataset",
    "load_image",
    "load_pope",
    "parse_object",
]


def dataset_task(name: str) -> str:
    """The task that scores dataset `name` (``yesno`` or ``open``)."""
    try:
        return DATASET_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    pope_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    questions_file: str | Path | None = None,
    annotations_file: str | Path | None = None,
    data_file: str | Path | None = None,
    question_ids: Collection[str] | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
) -> tuple[list[Sample], list[SampleError]]:
    """Samples and per-sample errors of a named dataset.

    ``"shapes-pope"``: reads the folder ``data_dir`` (as written by ``vrp data shapes-pope``); when
    ``data_dir`` is None, or names a folder that does not exist yet, the default set (seed
    ``DEFAULT_SEED``) is generated there or in the user cache first. ``split`` picks one split;
    None gives all three, in the order random, popular, adversarial.

    ``"pope"``: reads ``pope_file`` with images from ``image_dir`` (default: the file's folder);
    ``split`` defaults to the one in the file name.

    ``"vqav2"``: the official ``questions_file`` (+ optional ``annotations_file``) with images in
    ``image_dir``, or the single-file Parquet layout ``data_file``. ``"shapes-vqa"``: the folder
    ``data_dir`` written by ``vrp data shapes-vqa`` (the default set when absent).

    Any dataset: ``question_ids`` keeps only those questions; ``sample`` then draws that many,
    seeded by ``sample_seed`` and stratified by answer type.
    """
    if name in ("vqav2", "shapes-vqa"):
        samples, errors = _load_vqa(
            name, data_dir, image_dir, questions_file, annotations_file, data_file, question_ids
        )
    else:
        samples, errors = _load_pope(name, data_dir, split, pope_file, image_dir)
        if question_ids is not None:
            wanted = {str(q) for q in question_ids}
            samples = [s for s in samples if s.question_id in wanted]
    if sample is not None:
        samples = stratified_sample(samples, sample, sample_seed)
    return samples, errors


def _load_vqa(
    name: str,
    data_dir: str | Path | None,
    image_dir: str | Path | None,
    questions_file: str | Path | None,
    annotations_file: str | Path | None,
    data_file: str | Path | None,
    question_ids: Collection[str] | None,
) -> tuple[list[Sample], list[SampleError]]:
    if name == "shapes-vqa":
        if questions_file or annotations_file or data_file or image_dir:
            raise ValueError("shapes-vqa reads its own folder: pass --data-dir, not VQAv2 files")
        folder = ensure_shapes_vqa_dir(data_dir)
        return load_vqav2(
            folder / QUESTIONS_FILE,
            folder / "images",
            folder / ANNOTATIONS_FILE,
            dataset=name,
            question_ids=question_ids,
        )
    if data_file is not None:
        if questions_file or annotations_file:
            raise ValueError(
                "pass either --data-file (Parquet) or --questions-file/--annotations-file, not both"
            )
        return load_vqav2_parquet(data_file, dataset=name, question_ids=question_ids)
    if questions_file is None or image_dir is None:
        raise ValueError(
            "the vqav2 dataset needs --questions-file Q.json --image-dir DIR (and --annotations-file A.json "
            "to score the answers), or one Parquet file with --data-file"
        )
    return load_vqav2(questions_file, image_dir, annotations_file, dataset=name, question_ids=question_ids)


def _load_pope(
    name: str,
    data_dir: str | Path | None,
    split: str | None,
    pope_file: str | Path | None,
    image_dir: str | Path | None,
) -> tuple[list[Sample], list[SampleError]]:
    if name == "shapes-pope":
        if pope_file is not None or image_dir is not None:
            raise ValueError("shapes-pope reads its own folder: pass data_dir, not pope_file/image_dir")
        _check_split(split)
        folder = ensure_shapes_dir(data_dir)
        samples: list[Sample] = []
        errors: list[SampleError] = []
        for part in [split] if split is not None else list(SPLITS):
            got, bad = load_pope(
                folder / f"{part}.jsonl", folder / "images", dataset="shapes-pope", split=part
            )
            samples += got
            errors += bad
        return samples, errors
    if name == "pope":
        if pope_file is None:
            raise ValueError(
                "the pope dataset needs a POPE file (--pope-file coco_pope_adversarial.json) "
                "and the folder of its images (--image-dir)"
            )
        _check_split(split)
        folder = Path(image_dir) if image_dir is not None else Path(pope_file).parent
        return load_pope(pope_file, folder, dataset="pope", split=split)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
