"""Loading a VLM by registry name, local directory or hub id into its family adapter.

The family comes from ``config.model_type`` (never from the name), through the family registry
(``registry.py``); so do the registry names and the processor (the family adapter's
``load_processor``). The revision recorded for the run is the hub commit when the files came from the
hub cache, else a content hash of the checkpoint's config, safetensors index and weight files, so two
different toys saved to the same folder never share a run.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
import transformers

from .base import Adapter
from .registry import TOYS_DIR, checkpoint_names, family, family_of_model_type

__all__ = [
    "DTYPES",
    "REGISTRY",
    "TOYS_DIR",
    "adapter_class",
    "load_adapter",
    "load_processor",
    "resolve_source",
]

REGISTRY: dict[str, str] = checkpoint_names()

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Sizes at and below which a weight file is hashed whole; larger files contribute header + size + samples.
_FULL_HASH_LIMIT = 256 * 2**20
_SAMPLE = 2**20


def adapter_class(model_type: str) -> type[Adapter]:
    """The adapter whose family declares ``model_type``."""
    return family_of_model_type(model_type).adapter


def resolve_source(name_or_path: str) -> tuple[str, str]:
    """(source to load from, short name for the lake's ``model`` column)."""
    if name_or_path in REGISTRY:
        source = REGISTRY[name_or_path]
        if name_or_path.startswith("toy-") and not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(
                f"toy model {name_or_path!r} is not built: expected a checkpoint at {source}. Build the "
                "toy zoo first (`vrp toy` commands) or pass a directory made by "
                "vrp.ingest.models.tiny.build_tiny"
            )
        return source, name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json: not a model checkpoint")
        return str(path.resolve()), _model_name(path.resolve().name, str(path.resolve()))
    if path.suffix or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(
            f"{name_or_path!r} is not a registry name ({', '.join(sorted(REGISTRY))}), an existing "
            "directory, or a hub id of the form owner/name"
        )
    return name_or_path, _model_name(name_or_path.replace("/", "--"), name_or_path)


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _model_name(wanted: str, source: str) -> str:
    """The lake's ``model`` name for a checkpoint outside the registry.

    Per-model analyses group by this name, so two different checkpoints must never share it.
    When sanitising changed the name (a folder called ``toy llava``), or the name is a registry
    name of another checkpoint, a short hash of the source is appended: ``toy-llava-1a2b3c``.
    The lake writer also refuses a name already stored for another family or checkpoint.
    """
    name = _sanitise(wanted)
    if name != wanted or (name in REGISTRY and not _same_source(REGISTRY[name], source)):
        name = f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:6]}"
    return name


def _same_source(registered: str, source: str) -> bool:
    """Whether `source` is the registry entry's own checkpoint (its folder given as a path)."""
    if registered == source:
        return True
    return (
        Path(registered).is_dir()
        and Path(source).is_dir()
        and Path(registered).resolve() == Path(source).resolve()
    )


def _hash_file(digest: Any, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as handle:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(2**22), b""):
                digest.update(chunk)
            return
        header_len = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(min(header_len, 2**26)))
        for offset in (size // 2, max(0, size - _SAMPLE)):
            handle.seek(offset)
            digest.update(handle.read(_SAMPLE))


def checkpoint_revision(source: str, config: Any) -> str | None:
    """Hub commit hash when known, else ``sha256:<16 hex>`` of a local checkpoint's files.

    A hub id is resolved through the local hub cache: the snapshot folder its ``config.json`` was read
    from is named by the commit (transformers 5 does not keep ``_commit_hash`` on the model config).
    """
    path = Path(source)
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
            return Path(cached).parent.name
        commit = getattr(config, "_commit_hash", None)
        return str(commit) if commit else None
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        _hash_file(digest, weights)
    return "sha256:" + digest.hexdigest()[:16]


def load_processor(source: str, family_name: str) -> tuple[Any, bool]:
    """(processor, built_image_only) of a checkpoint, as its family loads it."""
    return family(family_name).adapter.load_processor(source)


def _apply_pixel_bounds(processor: Any, min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    """Set Qwen2-VL's resize bounds on the image processor; return the effective bounds."""
    ip = processor.image_processor
    size = dict(ip.size)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size
    for key, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
        if hasattr(ip, key):
            setattr(ip, key, value)
    return {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"])}


def load_adapter(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    attn_implementation: str = "sdpa",
    prompt_template: str | None = None,
) -> Adapter:
    """Load a checkpoint and wrap it in its family's adapter.

    ``prompt_template`` overrides the family prompt (``{question}`` and ``{image}`` placeholders), e.g.
    ``"{image}answer en {question}"`` for PaliGemma mix checkpoints; it is recorded in ``settings``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {', '.join(DTYPES)}")
    source, name = resolve_source(name_or_path)
    config = transformers.AutoConfig.from_pretrained(source)
    cls = adapter_class(config.model_type)
    spec = cls.spec
    if dtype == "float16" and spec.fp16_nan:
        raise ValueError(f"refusing float16 for {spec.family}: {spec.fp16_reason}")
    if (min_pixels is not None or max_pixels is not None) and not spec.dynamic_resolution:
        raise ValueError(
            f"min_pixels/max_pixels apply only to dynamic-resolution families (Qwen2-VL); {spec.family} "
            "always resizes to its fixed input size"
        )
    processor, image_only = cls.load_processor(source)
    settings: dict[str, Any] = {"image_only_processor": image_only}
    if spec.dynamic_resolution:
        settings.update(_apply_pixel_bounds(processor, min_pixels, max_pixels))
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        source, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    model.to(device).eval()
    return cls(
        model,
        processor,
        source=source,
        name=name,
        revision=checkpoint_revision(source, model.config),
        dtype=dtype,
        device=device,
        settings=settings,
        prompt_template=prompt_template,
    )
