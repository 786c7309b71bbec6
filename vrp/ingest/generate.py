"""K-sample self-consistency from the greedy answer's prefill.

``generate(num_return_sequences=K)`` copies the inputs, pixels included, before the prefill, so
the image is encoded K times. Here the prompt is encoded once (by :func:`capture_batch`), its KV
cache is cropped back to the prompt, repeated K times per row, and one batched decode loop draws
all K answers. Each draw has its own ``torch.Generator`` seeded from (run seed, sample id, k), so
a rerun, or the same sample in another batch, draws the same answers.

Usage::

    cap = capture_batch(adapter, enc, labels, keep_cache=True)
    texts = sample_answers(adapter, enc, cap.greedy_output, seeds=[[s0_0, ...], ...])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def sample_seed(base_seed: int, sample_id: str, k: int) -> int:
    """A 63-bit seed for draw k of one sample, independent of batching and order."""
    digest = hashlib.sha256(f"{base_seed}:{sample_id}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def top_p_filter(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering, rows renormalised. [N, V] -> [N, V].

    Keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (always at least
    one token), the same rule as transformers' TopPLogitsWarper.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = probs * keep
    return filtered / filtered.sum(-1, keepdim=True)


class SeededSampler(LogitsProcessor):
    """Draws each row's next token with that row's own generator; greedy decoding then picks it.

    Returning a score of 0 for the drawn token and -inf elsewhere turns transformers' greedy
    loop into per-row seeded sampling, so EOS handling and input preparation stay the model's own.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = []
        for seed in seeds:
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.generators.append(generator)
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = top_p_filter(scores, self.temperature, self.top_p).cpu()
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        cdf = probs.double().cumsum(-1)
        cdf[:, -1] = 1.0
        chosen = torch.searchsorted(cdf, uniforms[:, None]).squeeze(-1).clamp_max(probs.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return out


def _owner(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """(module, attribute name) of a dotted attribute path such as "model.rope_deltas"."""
    owner_path, _, attr = path.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), attr


def _expand_state(model: torch.nn.Module, paths: Sequence[str], k: int) -> dict[str, Any]:
    """Repeat the per-row tensors a model keeps between prefill and decoding (e.g. M-RoPE deltas)."""
    saved = {}
    for path in paths:
        owner, attr = _owner(model, path)
        value = getattr(owner, attr, None)
        saved[path] = value
        if isinstance(value, torch.Tensor):
            setattr(owner, attr, value.repeat_interleave(k, dim=0))
    return saved


def _restore_state(model: torch.nn.Module, saved: dict[str, Any]) -> None:
    for path, value in saved.items():
        owner, attr = _owner(model, path)
        setattr(owner, attr, value)


def sample_answers(
    adapter: Any,
    enc: Any,
    greedy_output: Any,
    seeds: Sequence[Sequence[int]],
    *,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 8,
    return_logits: bool = False,
) -> tuple[list[list[str]], Any]:
    """K answers per row decoded from the greedy answer's prefill cache.

    ``seeds[b]`` holds the K seeds of row b. Returns the texts [B][K] and, with
    ``return_logits``, transformers' generate output (raw logits of every step) for checks.
    """
    model = adapter.model
    k = len(seeds[0])
    if any(len(row) != k for row in seeds):
        raise ValueError("every sample needs the same number of seeds")
    input_ids = enc.inputs["input_ids"]
    prompt_len = input_ids.shape[1]
    cache = greedy_output.cache
    # Drop the greedy answer and the last prompt token: generate recomputes that token, which
    # gives the first sampled token's logits without touching the image again.
    cache.crop(-(cache.get_seq_length() - (prompt_len - 1)))
    cache.batch_repeat_interleave(k)
    # Every per-row input but the pixels (the image is already in the cache): token types for
    # PaliGemma's prefix mask, M-RoPE's grid and token types for Qwen2-VL.
    extra = {
        name: value.repeat_interleave(k, dim=0)
        for name, value in enc.inputs.items()
        if name not in ("input_ids", "attention_mask") and not name.startswith("pixel_values")
    }
    saved = _expand_state(model, adapter.spec.decode_state, k)
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.repeat_interleave(k, dim=0),
                attention_mask=enc.inputs["attention_mask"].repeat_interleave(k, dim=0),
                cache=cache,
                **extra,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList(
                    [SeededSampler([s for row in seeds for s in row], temperature, top_p)]
                ),
                return_dict_in_generate=True,
                output_logits=return_logits,
                pad_token_id=adapter.tokenizer.pad_token_id,
            )
    finally:
        _restore_state(model, saved)
    texts = adapter.tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    grouped = [texts[b * k : (b + 1) * k] for b in range(len(seeds))]
    return grouped, (out if return_logits else None)
