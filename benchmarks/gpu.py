"""GPU benchmark: real-size random-weight VLMs, a bare greedy run vs VRP's capture vs an eager extractor.

What a researcher weighs before adopting VRP on a GPU: how much a capture of every signal costs
over the evaluation run they would do anyway. For LLaVA-1.5-7B and Qwen2-VL-7B (and Gemma 3 4B
when the family registry has it), each built with random weights in bfloat16 straight on the GPU
from the published config sizes (written below, no hub), with the family's own processor built
offline, on POPE-like prompts (a 640x480 picture, "Is there a X in the image?"), at batch 1 and 16:

  forward    one bare SDPA forward of the prompt (last position's logits only)
  greedy     transformers ``generate``, greedy, ``--max-new-tokens`` (what an evaluation harness does)
  prefill    VRP's capture with a one-token answer: answer-row attention, traced sites, logit lens,
             evidence maps and every per-layer summary (compare with ``forward``)
  vrp        VRP's capture with the whole greedy answer (compare with ``greedy``)
  vrp_sc     ``vrp`` with K self-consistency samples (``--k``), decoded with the greedy answer in one
             loop from the capture's prefill
  sc         the greedy answer and the same K samples as VRP decodes them (a one-token prefill, then
             one loop), without VRP's capture (compare with ``greedy``)
  eager      what attention tools do: eager attention, ``generate`` with ``output_attentions`` and
             ``output_hidden_states``, the answer rows and hidden states moved to the host and
             ``torch.save``d

Time: after one warm-up of the bare variants, every variant runs once alone for its memory (the
rise of ``torch.cuda.max_memory_allocated`` over what was allocated before the call, peak stats
reset in between; an out-of-memory error is caught and reported), then all variants run
round-robin ``--repeats`` times (CUDA-synchronised), so a change in load hits all alike; the table
gives the median and the min-max spread. ``new tok/s`` is batch x new tokens over the median.
``--probe-batches`` then tries larger batches once each (memory only) until eager runs out of
memory. A lake is not written: this machine may lack deltalake, and
the lake libraries are blocked on import to prove the script does not need them.

Prints a markdown table and writes JSON to $OUT/gpu.json when $OUT is set (after every block, so
a run cut short keeps what it measured). ``--smoke`` runs the same code on tiny configs (CPU is
enough) and checks the real-size configs on the meta device (parameter count, image tokens).

Usage:  PYTHONPATH=. python benchmarks/gpu.py [--families llava,qwen2vl,gemma3] [--batches 1,16]
        [--repeats 3] [--max-new-tokens 8] [--k 10] [--probe-batches 64,128,256] [--budget-s 270] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LAKE_LIBRARIES = ("deltalake", "duckdb", "polars")


class _NoLake(importlib.abc.MetaPathFinder):
    """Refuse the lake libraries: the GPU machine has none of them, so neither may this script."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in _LAKE_LIBRARIES:
            raise ImportError(
                f"benchmarks/gpu.py must run without {name} (the GPU machine has no lake stack)"
            )
        return None


sys.meta_path.insert(0, _NoLake())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# POPE's objects are COCO categories; the tiny word-level tokenizer learns them as words.
OBJECTS = ("dog", "person", "car", "chair", "cup", "bottle", "bench", "umbrella")

# Published sizes of each checkpoint (their config.json), applied over the tiny checkpoint's config so
# the token ids, processor and family wiring stay the ones VRP's tests use. ``build``: build_tiny's
# image geometry (the processor the model's real checkpoint ships: LLaVA 336/14 -> 576 tokens).
REAL: dict[str, dict[str, Any]] = {
    "llava": {  # llava-hf/llava-1.5-7b-hf
        "name": "llava-1.5-7b",
        "params": 7_063_427_072,
        "build": {"image_size": 336, "patch_size": 14},
        "top": {"tie_word_embeddings": False, "image_seq_length": 576},
        "text": {
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "projection_dim": 768,
        },
    },
    "qwen2vl": {  # Qwen/Qwen2-VL-7B-Instruct
        "name": "qwen2-vl-7b",
        "params": 8_291_375_616,
        "build": {"image_size": 672, "patch_size": 14, "spatial_merge_size": 2, "max_pixels": 12_845_056},
        "top": {"tie_word_embeddings": False},
        "text": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16},
    },
    "gemma3": {  # google/gemma-3-4b-it
        "name": "gemma-3-4b",
        "params": 4_300_079_472,
        "build": {"image_size": 896, "patch_size": 14, "grid": 16},  # 64x64 patches pooled to 16x16
        "top": {"mm_tokens_per_image": 256, "tie_word_embeddings": True},
        "text": {
            "vocab_size": 262208,
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 1024,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6,
        },
        "vision": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 896,
            "patch_size": 14,
        },
    },
}

# Keys a config derives from its sizes; dropped from the tiny config so the real sizes re-derive them.
_DERIVED = ("layer_types",)

VARIANTS = ("forward", "greedy", "prefill", "vrp", "vrp_sc", "sc", "eager")


def real_config(config: Any, spec: dict[str, Any]) -> Any:
    """The tiny checkpoint's config with the published sizes of the real checkpoint."""
    data = config.to_dict()
    for part in ("text", "vision"):
        sub = {k: v for k, v in data[f"{part}_config"].items() if k not in _DERIVED}
        sub.update(spec[part])
        data[f"{part}_config"] = sub
    data.update(spec["top"])
    return type(config).from_dict(data)


def pope_inputs(batch: int, side: tuple[int, int]) -> tuple[list[Image.Image], list[str], list[str]]:
    """`batch` noise pictures of size `side` (w, h), POPE-style questions, alternating yes/no labels."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (side[1], side[0], 3), dtype=np.uint8)) for _ in range(batch)
    ]
    questions = [f"Is there a {OBJECTS[i % len(OBJECTS)]} in the image?" for i in range(batch)]
    labels = ["yes" if i % 2 == 0 else "no" for i in range(batch)]
    return images, questions, labels


def build_adapter(family: str, root: Path, *, smoke: bool, device: str, dtype: torch.dtype) -> Any:
    """The family's adapter over a random-weight model built on `device` (real sizes unless smoke).

    The processor comes from a tiny checkpoint saved by ``build_tiny`` and loaded by
    ``load_adapter``, the path a user's checkpoint takes; only the model is rebuilt, from the
    config, directly on the device (no weights are written or read).
    """
    from transformers import AutoModelForImageTextToText

    from vrp.ingest.models import load_adapter
    from vrp.ingest.models.tiny import build_tiny

    spec = REAL[family]
    build = {} if smoke else spec["build"]
    path = build_tiny(family, root / family, seed=0, vocab_words=OBJECTS, **build)
    tiny = load_adapter(str(path))
    config = tiny.model.config if smoke else real_config(tiny.model.config, spec)
    del tiny.model
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.pad_token_id = tiny.tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny.tokenizer.eos_token_id
    return type(tiny)(
        model,
        tiny.processor,
        source=str(path),
        name=spec["name"] + ("-smoke" if smoke else "-random"),
        revision=None,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
    )


def make_variants(
    adapter: Any, images: list[Image.Image], questions: list[str], labels: list[str], new_tokens: int, k: int
) -> dict[str, Callable[[], None]]:
    """One zero-argument callable per variant (module docstring), each dropping its outputs."""

    from vrp.ingest.capture import capture_batch, prefill_one_token
    from vrp.ingest.generate import decode_answers, sample_seed

    model = adapter.model
    enc = adapter.encode(images, questions)
    pad = adapter.tokenizer.pad_token_id
    every_layer = list(range(adapter.num_layers))
    seeds = [[sample_seed(0, f"q{b}", i) for i in range(k)] for b in range(len(images))]
    capture = {"images": images, "questions": questions, "evidence_layers": every_layer}

    def forward() -> None:
        model(**enc.inputs, logits_to_keep=1)

    def greedy() -> None:
        model.generate(**enc.inputs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)

    def prefill() -> None:
        capture_batch(adapter, enc, labels, max_new_tokens=1, **capture)

    def vrp() -> None:
        capture_batch(adapter, enc, labels, max_new_tokens=new_tokens, **capture)

    def vrp_sc() -> None:
        capture_batch(adapter, enc, labels, max_new_tokens=new_tokens, seeds=seeds, **capture)

    def sc() -> None:
        decode_answers(adapter, enc, prefill_one_token(adapter, enc), seeds, max_new_tokens=new_tokens)

    def eager() -> None:
        model.set_attn_implementation("eager")
        try:
            out = model.generate(
                **enc.inputs,
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_attentions=True,
                output_hidden_states=True,
            )
        finally:
            model.set_attn_implementation("sdpa")
        rows = torch.arange(len(images), device=enc.answer_pos.device)
        pos = enc.answer_pos
        attention = torch.stack([layer[rows, :, pos] for layer in out.attentions[0]]).float().cpu()
        hidden = torch.stack([h[rows, pos] for h in out.hidden_states[0][1:]]).float().cpu()
        torch.save({"attention": attention, "hidden": hidden, "tokens": out.sequences.cpu()}, io.BytesIO())

    return {
        "forward": forward,
        "greedy": greedy,
        "prefill": prefill,
        "vrp": vrp,
        "vrp_sc": vrp_sc,
        "sc": sc,
        "eager": eager,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _error(err: BaseException) -> str:
    """One line naming the error and where it was raised (the last frame of the traceback)."""
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"[:400]


def peak_memory(fn: Callable[[], None], device: str) -> tuple[float | None, str | None]:
    """(MiB allocated above the level before the call, at the call's peak; error) of one call.

    On CPU there is no allocator to ask (``benchmarks/capture.py`` measures RSS there): None.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    try:
        fn()
        _sync(device)
    except Exception as err:  # an OOM or a failure of this variant alone; the others still run
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return None, _error(err)
    if device != "cuda":
        return None, None
    return (torch.cuda.max_memory_allocated() - base) / 2**20, None


def measure(variants: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, dict[str, Any]]:
    """Per variant: peak extra MiB of its first call, then seconds of `repeats` round-robin calls."""
    out: dict[str, dict[str, Any]] = {name: {"times": []} for name in variants}
    for name in ("forward", "greedy"):  # kernels, cuBLAS handles and workspaces: not a variant's cost
        variants[name]()
    for name, fn in variants.items():
        out[name]["peak_mib"], out[name]["error"] = peak_memory(fn, device)
    live = [name for name in variants if out[name]["error"] is None]
    for _ in range(repeats):
        for name in list(live):
            _sync(device)
            start = time.perf_counter()
            try:
                variants[name]()
                _sync(device)
            except Exception as err:
                out[name]["error"] = _error(err)
                live.remove(name)
                continue
            out[name]["times"].append(time.perf_counter() - start)
    for row in out.values():
        times = row["times"]
        row["median_s"] = statistics.median(times) if times else None
        row["min_s"] = min(times) if times else None
        row["max_s"] = max(times) if times else None
    return out


def probe_memory(
    adapter: Any, side: tuple[int, int], batches: list[int], device: str
) -> list[dict[str, Any]]:
    """Peak extra memory at larger batches, one call each, until eager runs out of memory.

    Forward and eager at every batch; VRP's prefill at the first only (its per-sample host
    summaries make a large batch slow, and its device memory grows linearly with the batch).
    """
    rows: list[dict[str, Any]] = []
    for batch in batches:
        if any(row["variant"] == "eager" and row["error"] for row in rows):
            break
        images, questions, labels = pope_inputs(batch, side)
        variants = make_variants(adapter, images, questions, labels, 1, 1)
        for name in ("forward", "prefill", "eager") if batch == batches[0] else ("forward", "eager"):
            start = time.perf_counter()
            peak, error = peak_memory(variants[name], device)
            rows.append(
                {
                    "batch": batch,
                    "variant": name,
                    "peak_mib": peak,
                    "error": error,
                    "seconds": time.perf_counter() - start,
                }
            )
        del variants
    return rows


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The ratios the issue's targets are about (None where a side failed)."""

    def time_ratio(a: str, b: str) -> float | None:
        x, y = rows[a]["median_s"], rows[b]["median_s"]
        return None if x is None or y is None else x / y

    def extra(name: str) -> float | None:
        a, b = rows[name]["peak_mib"], rows["forward"]["peak_mib"]
        return None if a is None or b is None else a - b

    eager_extra, prefill_extra = extra("eager"), extra("prefill")
    memory = None
    if eager_extra is not None and prefill_extra is not None:
        memory = eager_extra / max(prefill_extra, 1.0)  # an extra below 1 MiB counts as 1 MiB
    return {
        "prefill/forward": time_ratio("prefill", "forward"),
        "vrp/greedy": time_ratio("vrp", "greedy"),
        "vrp_sc/greedy": time_ratio("vrp_sc", "greedy"),
        "sc/greedy": time_ratio("sc", "greedy"),
        "eager/greedy": time_ratio("eager", "greedy"),
        "extra memory eager/prefill": memory,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_block(
    family: str, batch: int, tokens: int, rows: dict[str, dict[str, Any]], new_tokens: int
) -> None:
    print(f"\n### {family}, batch {batch}, {tokens} prompt tokens per row\n")
    print("| variant | median s | min-max s | x greedy | x forward | new tok/s | extra peak MiB | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    greedy, forward = rows["greedy"]["median_s"], rows["forward"]["median_s"]
    for name, row in rows.items():
        median = row["median_s"]
        spread = f"{_fmt(row['min_s'], '.3f')}-{_fmt(row['max_s'], '.3f')}"
        made = 1 if name in ("forward", "prefill") else new_tokens
        rate = None if median is None else batch * made / median
        x_greedy = None if median is None or greedy is None else median / greedy
        x_forward = None if median is None or forward is None else median / forward
        cells = [_fmt(median, ".3f"), spread, _fmt(x_greedy, ".2f"), _fmt(x_forward, ".2f")]
        cells += [_fmt(rate, ".1f"), _fmt(row["peak_mib"], ".0f"), row["error"] or ""]
        print(f"| {name} | " + " | ".join(cells) + " |")
    summary = ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in ratios(rows).items())
    print(f"\nratios: {summary}")


def check_real_configs(families: list[str], root: Path) -> list[dict[str, Any]]:
    """On the meta device: each real-size config's parameter count and a POPE batch's image tokens."""
    from transformers import AutoModelForImageTextToText

    from vrp.ingest.models import load_adapter
    from vrp.ingest.models.tiny import build_tiny

    rows = []
    for family in families:
        spec = REAL[family]
        path = build_tiny(family, root / f"{family}-meta", seed=0, vocab_words=OBJECTS, **spec["build"])
        tiny = load_adapter(str(path))
        config = real_config(tiny.model.config, spec)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        tiny.model = model  # geometry only: encode reads the vision config and the parameters' dtype
        images, questions, _ = pope_inputs(2, (640, 480))
        enc = tiny.encode(images, questions)
        rows.append(
            {
                "family": family,
                "params": params,
                "published_params": spec["params"],
                "image_tokens": [len(p) for p in enc.image_pos],
                "grid": list(enc.grids[0]),
                "layers": int(config.get_text_config().num_hidden_layers),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default="llava,qwen2vl,gemma3")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--k", type=int, default=10, help="self-consistency samples")
    parser.add_argument("--probe-batches", default="64,128,256", help="memory-only batches ('' for none)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no new block after this")
    parser.add_argument("--smoke", action="store_true", help="tiny configs (CPU is enough), one repeat")
    args = parser.parse_args(argv)

    from vrp.ingest.models import FAMILIES

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    probes = [int(b) for b in args.probe_batches.split(",") if b]
    repeats, new_tokens, k = args.repeats, args.max_new_tokens, args.k
    side = (640, 480)
    if args.smoke:
        batches, probes, repeats, new_tokens, k, side = [1, 2], [3, 4], 1, 2, 2, (64, 48)
    import transformers

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype),
        "smoke": args.smoke,
        "repeats": repeats,
        "max_new_tokens": new_tokens,
        "k": k,
        "picture": list(side),
        "blocks": [],
        "probes": [],
        "skipped": [],
    }
    out_dir = os.environ.get("OUT")

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - started
        if out_dir:
            Path(out_dir, "gpu.json").write_text(json.dumps(report, indent=1) + "\n")

    print(f"device {report['device']}, torch {torch.__version__}, transformers {transformers.__version__}")
    families = []
    for family in args.families.split(","):
        if family not in FAMILIES or family not in REAL:
            report["skipped"].append({"family": family, "why": "not in this checkout's family registry"})
            print(f"skipping {family}: not in this checkout's family registry")
        else:
            families.append(family)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            report["real_configs"] = check_real_configs(families, Path(tmp))
            for row in report["real_configs"]:
                print(f"real config {row}")
        for family in families:
            if time.perf_counter() - started > args.budget_s:
                report["skipped"].append(
                    {"family": family, "why": f"time budget {args.budget_s:.0f} s spent"}
                )
                continue
            built = time.perf_counter()
            try:
                adapter = build_adapter(family, Path(tmp), smoke=args.smoke, device=device, dtype=dtype)
            except Exception as err:
                report["skipped"].append({"family": family, "why": _error(err)})
                print(f"skipping {family}: {_error(err)}")
                save()
                continue
            print(f"\n## {family}: {adapter!r}, built in {time.perf_counter() - built:.1f} s")
            with torch.no_grad():
                for batch in batches:
                    if time.perf_counter() - started > args.budget_s:
                        report["skipped"].append(
                            {"family": family, "batch": batch, "why": "time budget spent"}
                        )
                        continue
                    images, questions, labels = pope_inputs(batch, side)
                    variants = make_variants(adapter, images, questions, labels, new_tokens, k)
                    tokens = int(adapter.encode(images[:1], questions[:1]).inputs["input_ids"].shape[1])
                    rows = measure(variants, repeats, device)
                    print_block(family, batch, tokens, rows, new_tokens)
                    report["blocks"].append(
                        {
                            "family": family,
                            "batch": batch,
                            "prompt_tokens": tokens,
                            "variants": rows,
                            "ratios": ratios(rows),
                        }
                    )
                    del variants
                    save()
                if probes and time.perf_counter() - started <= args.budget_s:
                    for row in probe_memory(adapter, side, probes, device):
                        report["probes"].append({"family": family, **row})
                        print(
                            f"memory probe {family} batch {row['batch']} {row['variant']}: "
                            f"{_fmt(row['peak_mib'], '.0f')} MiB {row['error'] or ''}"
                        )
                    save()
            del adapter
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    save()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
