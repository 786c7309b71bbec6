"""The greedy answer and K self-consistency samples, decoded in one loop from one prefill.

``generate(num_return_sequences=K)`` copies the inputs, pixels included, before the prefill, so
the image is encoded K times. Here the prompt is encoded once (by :func:`capture_batch`, with
every capture active) and then, per row, the greedy continuation and its K samples decode as
K + 1 sequences of one batched loop from that prefill, without copying it: the prompt's keys and
values stay in one copy per row (:class:`SharedPrefixLayer`), each sequence caches only the few
tokens it generated, and :func:`shared_prefix_attention` scores every query against the shared
prompt and against its own suffix in one softmax. Repeating the cache instead
(``batch_repeat_interleave``) would copy the whole prompt cache K + 1 times, and transformers'
``DynamicCache`` re-copies it at every step as it grows; on a 600-token prompt that copying costs
more than the decoding's arithmetic, which is why the greedy answer takes this loop too, also
without samples.

Each draw has its own ``torch.Generator`` seeded from (run seed, sample id, k), so a rerun, or the
same sample in another batch, draws the same answers.

Usage::

    cap = capture_batch(adapter, enc, labels, seeds=[[s0_0, ...], ...])  # calls decode_answers
    cap.sampled[0]  # row 0's K sampled texts; cap.samples[0]["answer_text"] its greedy answer

    decoded = decode_answers(adapter, enc, prefill_one_token(adapter, enc), seeds, max_new_tokens=8)
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vrp.ingest.capture import (
    ForwardHooks,
    attention_layer_index,
    end_token_ids,
    eos_token_ids,
    require_every_layer,
    route_attention,
)

if TYPE_CHECKING:
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from vrp.ingest.models import Adapter, Encoded

SHARED_PREFIX_BACKEND = "vrp_shared_prefix"
"""Name under which :func:`shared_prefix_attention` is registered with transformers."""


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

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """One token per row from its temperature / top-p distribution, using that row's generator."""
        probs = top_p_filter(scores, self.temperature, self.top_p).cpu()
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        cdf = probs.double().cumsum(-1)
        cdf[:, -1] = 1.0
        chosen = torch.searchsorted(cdf, uniforms[:, None]).squeeze(-1).clamp_max(probs.shape[-1] - 1)
        return chosen.to(scores.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), self.draw(scores)] = 0.0
        return out


class SharedPrefixLayer(DynamicLayer):
    """One decoder layer's cache: the prompt once per row, the generated tokens once per sequence.

    ``prefix_keys``/``prefix_values`` are [B, H_kv, P, D] (a view of the prefill's cache, not a
    copy); ``keys``/``values`` hold the [B*G, H_kv, s, D] suffix of the G sequences per row, which
    :meth:`update` grows. The reported length is P + s, so the model derives positions, cache
    positions and its mask for the full sequence exactly as with an ordinary cache; only the
    attention function must know that the first P columns live in the prefix (it gets them from
    :class:`_SharedPrefix`).
    """

    is_croppable = False

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache is already expanded to its sequences per row")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prefix cache cannot drop rows")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a shared-prefix cache does not support beam search")


@dataclass
class _SharedPrefix:
    """The active shared-prefix cache and which attention modules read which of its layers."""

    cache: Cache
    layer_of: dict[int, int]  # id(attention module) -> decoder layer index
    served: set[int] = field(default_factory=set)


_ACTIVE: contextvars.ContextVar[_SharedPrefix | None] = contextvars.ContextVar(
    "vrp_shared_prefix", default=None
)


def _to_shared(x: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """[B*S, H_kv*G, T, E] -> [B, H_kv, S*G*T, E]: the queries of a row's S sequences side by side.

    S is the sequences per row (the greedy answer and its K samples), G the query heads per KV head.
    """
    n, _, t, e = x.shape
    k = n // rows
    x = x.view(rows, k, -1, groups, t, e).permute(0, 2, 1, 3, 4, 5)
    return x.reshape(rows, x.shape[1], k * groups * t, e)


def _from_shared(x: torch.Tensor, k: int, groups: int, t: int) -> torch.Tensor:
    """Inverse of :func:`_to_shared`: [B, H_kv, S*G*T, E] -> [B*S, H_kv*G, T, E] (S = ``k``)."""
    rows, kv_heads, _, e = x.shape
    x = x.view(rows, kv_heads, k, groups, t, e).permute(0, 2, 1, 3, 4, 5)
    return x.reshape(rows * k, kv_heads * groups, t, e)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over [shared prompt | own suffix] with one softmax; a plain SDPA call otherwise.

    ``query`` is [B*S, H, T, D] for S sequences per row (the greedy answer and its K samples);
    ``key``/``value`` are the suffix that :class:`SharedPrefixLayer` returns. Scores against the
    prompt come from one matmul per row (all S*H/H_kv queries that share a KV head and a prompt at
    once), so the prompt's keys and values are read once per step instead of S times. Both score
    blocks are concatenated before the mask and the softmax, which is eager attention's arithmetic
    on the same columns in the same order. A sliding window (Gemma 3's local layers) is part of the
    model's mask over those columns: the cache keeps every prompt key (:func:`capture_batch`
    decodes with a full-length cache), so column j is position j.
    """
    state = _ACTIVE.get()
    layer = None if state is None else state.layer_of.get(id(module))
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs
        )
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            "shared-prefix decoding supports masked softmax attention only; this model adds a position "
            "bias (run with --self-consistency 0, or add the case to shared_prefix_attention)"
        )
    state.served.add(layer)
    cache_layer = state.cache.layers[layer]
    prefix_k, prefix_v = cache_layer.prefix_keys, cache_layer.prefix_values
    n, heads, t, _ = query.shape
    rows, kv_heads, prefix_len, _ = prefix_k.shape
    k, groups = n // rows, heads // kv_heads
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_shared = _to_shared(query, rows, groups)
    prefix_scores = _from_shared(q_shared @ prefix_k.transpose(-1, -2), k, groups, t)
    q_own = query.view(n, kv_heads, groups * t, -1)
    own_scores = (q_own @ key.transpose(-1, -2)).view(n, heads, t, key.shape[-2])
    scores = torch.cat([prefix_scores, own_scores], dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = _from_shared(_to_shared(probs[..., :prefix_len], rows, groups) @ prefix_v, k, groups, t)
    own = probs[..., prefix_len:].reshape(n, kv_heads, groups * t, -1) @ value
    out = out + own.view(n, heads, t, -1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX_BACKEND, shared_prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_BACKEND, sdpa_mask)


def shared_prefix(adapter: Adapter, cache: Cache) -> AbstractContextManager[_SharedPrefix]:
    """Route the model's attention through :func:`shared_prefix_attention` for the block's duration.

    Check with :func:`require_every_layer` after the block: a layer whose attention bypassed it
    would have attended to its suffix alone.
    """
    state = _SharedPrefix(cache=cache, layer_of=attention_layer_index(adapter))
    return route_attention(adapter.model, SHARED_PREFIX_BACKEND, _ACTIVE, state)


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


def _cut_at_end(tokens: torch.Tensor, end_ids: set[int], pad_id: int) -> torch.Tensor:
    """Replace everything after each row's first end token by padding.

    The decode loop does not know that a row whose first token (chosen before the loop) was an end
    token has finished, so such a row decodes on; what it decodes after its end is not its answer.
    """
    is_end = torch.isin(tokens, torch.tensor(sorted(end_ids), device=tokens.device))
    after_end = (is_end.cumsum(-1) - is_end.long()) > 0
    return tokens.masked_fill(after_end, pad_id)


class GreedyAndSampled(LogitsProcessor):
    """Row 0 of every group of K + 1 keeps its scores, rows 1..K get :class:`SeededSampler`'s draw.

    Runs after the generation config's own processors (transformers appends a custom processor to
    them), so generate's argmax over a greedy row is exactly its greedy rule, repetition penalty
    and all, and a sample row sees the same processed scores as when the K samples decoded alone.
    """

    def __init__(self, sampler: SeededSampler, group: int) -> None:
        self.sampler = sampler
        self.group = group

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.group == 1:
            return scores
        grouped = scores.view(-1, self.group, scores.shape[-1])
        drawn = self.sampler(input_ids, grouped[:, 1:].reshape(-1, scores.shape[-1]))
        return torch.cat([grouped[:, :1], drawn.view(grouped.shape[0], self.group - 1, -1)], dim=1).view_as(
            scores
        )


class KeepLogits(ForwardHooks):
    """Keeps the raw next-token logits of some rows at every forward of the decode loop.

    Usage::

        with KeepLogits(model, rows) as kept:
            model.generate(...)
        kept.steps  # one [len(rows), V] float32 tensor per forward

    ``generate(output_logits=True)`` would keep every row's [N, V] logits of every step (with
    Gemma 3's 262k-token vocabulary and K = 10 that is most of the decode's memory) where the
    answer's statistics need the greedy rows' only. The model's output logits are the raw ones
    generate reads (final soft-capping included), before any logits processor.
    """

    def __init__(self, model: torch.nn.Module, rows: torch.Tensor | None) -> None:
        self.model = model
        self.rows = rows  # None keeps every row
        self.steps: list[torch.Tensor] = []

    def _targets(self) -> Iterator[tuple[torch.nn.Module, Callable[..., Any]]]:
        yield self.model, self._hook

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        last = output.logits[:, -1]
        if self.rows is not None:
            last = last[self.rows.to(last.device)]
        self.steps.append(last.to(copy=True, dtype=torch.float32))


@dataclass
class SampleOutput:
    """Token ids and raw per-step logits of the K samples, for checks against fresh forward passes."""

    sequences: torch.Tensor  # [B*K, P + n]
    logits: tuple[torch.Tensor, ...]  # n x [B*K, V]


@dataclass
class Decoded:
    """The greedy answer of every row as generate alone gives it, and the texts of its K samples."""

    tokens: torch.Tensor  # [B, n] the greedy answer's ids, padding after its EOS
    logits: tuple[torch.Tensor, ...]  # n x [B, V] float32 raw logits of the greedy answer's steps
    sampled: list[list[str]]  # [B][K] the samples' texts
    samples: SampleOutput | None = None  # with ``return_logits``: the samples' ids and logits


def decode_answers(
    adapter: Adapter,
    enc: Encoded,
    prefill: GenerateDecoderOnlyOutput,
    seeds: Sequence[Sequence[int]],
    *,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 8,
    return_logits: bool = False,
) -> Decoded:
    """The greedy answer and K samples per row, decoded together from the prompt's prefill.

    ``prefill`` is transformers' generate output for one new token over ``enc`` with its cache
    and raw logits (``vrp.ingest.capture.prefill_one_token``, which :func:`capture_batch` runs).
    ``seeds[b]`` holds row b's K seeds (none for K = 0). The greedy answer's first token is the
    prefill's; each sample's first token is drawn from the
    prefill's logits, which are exactly the distribution of a fresh pass over the prompt. Then
    per row the greedy sequence and its K samples continue as K + 1 rows of one decode loop from
    the prompt's cache shared by all (:class:`SharedPrefixLayer`); no loop runs when every row
    ended at its first token. The greedy answer is cut and trimmed to what generate alone returns
    (it ends at EOS; its steps stop when every row's answer has ended), so its tokens, text and
    logits do not depend on K. With ``return_logits`` the samples' ids and raw logits come back
    too (``samples``), for checks.
    """
    k = len(seeds[0]) if seeds else 0
    if any(len(row) != k for row in seeds):
        raise ValueError("every sample needs the same number of seeds")
    if not getattr(prefill, "logits", None) or getattr(prefill, "cache", None) is None:
        raise ValueError(
            "the prefill has no logits or no cache: run it with output_logits=True, "
            "return_dict_in_generate=True and max_new_tokens=1 (capture_batch does)"
        )
    input_ids = enc.inputs["input_ids"]
    rows, prompt_len = input_ids.shape
    group = k + 1
    pad_id = adapter.tokenizer.pad_token_id
    end_ids, eos_ids = end_token_ids(adapter), eos_token_ids(adapter)
    sampler = SeededSampler([s for row in seeds for s in row], temperature, top_p)
    first_logits = prefill.logits[0]
    greedy_first = prefill.sequences[:, prompt_len].to(input_ids.device)
    drawn = input_ids.new_empty((rows, 0))
    if k:
        drawn = sampler.draw(first_logits.repeat_interleave(k, dim=0)).to(input_ids.device).view(rows, k)
    first = torch.cat([greedy_first[:, None], drawn], dim=1).view(-1)
    sequences = torch.cat([input_ids.repeat_interleave(group, dim=0), first[:, None]], dim=1)
    greedy_rows = torch.arange(rows) * group
    step_logits: list[torch.Tensor] = []
    ended = set(greedy_first.tolist()) <= eos_ids and set(drawn.view(-1).tolist()) <= end_ids
    if max_new_tokens > 1 and not ended:
        keep = KeepLogits(adapter.model, None if return_logits else greedy_rows)
        processor = GreedyAndSampled(sampler, group)
        with keep:
            sequences = _decode_from_prefix(
                adapter, enc, prefill.cache, sequences, group, processor, max_new_tokens - 1
            )
        # generate may run one forward more than it keeps (transformers' deferred stop check)
        step_logits = keep.steps[: sequences.shape[1] - prompt_len - 1]
    new_tokens = sequences[:, prompt_len:]

    greedy = _cut_at_end(new_tokens[greedy_rows], eos_ids, pad_id)
    is_eos = torch.isin(greedy, torch.tensor(sorted(eos_ids), device=greedy.device))
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, greedy.shape[1])
    steps = int(lengths.max())
    if return_logits:  # the hook kept every row
        greedy_logits = [first_logits.float(), *(step[greedy_rows] for step in step_logits)]
    else:
        greedy_logits = [first_logits.float(), *step_logits]

    sample_rows = torch.arange(rows * group).view(rows, group)[:, 1:].reshape(-1)
    sample_tokens = _cut_at_end(new_tokens[sample_rows], end_ids, pad_id)
    texts = adapter.tokenizer.batch_decode(sample_tokens, skip_special_tokens=True)
    decoded = Decoded(
        tokens=greedy[:, :steps],
        logits=tuple(greedy_logits[:steps]),
        sampled=[texts[b * k : (b + 1) * k] for b in range(rows)],
    )
    if return_logits:
        sample_first = first_logits.repeat_interleave(k, dim=0)
        decoded.samples = SampleOutput(
            sequences=torch.cat([sequences[sample_rows, :prompt_len], sample_tokens], dim=1),
            logits=(sample_first, *(step[sample_rows] for step in step_logits)),
        )
    return decoded


def _decode_from_prefix(
    adapter: Adapter,
    enc: Encoded,
    prompt_cache: Cache,
    sequences: torch.Tensor,
    group: int,
    processor: LogitsProcessor,
    max_new_tokens: int,
) -> torch.Tensor:
    """Continue ``sequences`` (prompt + first token, [B*G, P+1]) with one batched decode loop -> ids.

    The cache holds the prompt once per row, a view of the prefill's cache cut back to the prompt;
    transformers' greedy loop then picks the token ``processor`` leaves on top at each step, so EOS
    handling, padding of finished rows and per-family input preparation stay the model's own.
    """
    model = adapter.model
    prompt_len = enc.inputs["input_ids"].shape[1]
    cache = Cache(
        layers=[
            SharedPrefixLayer(layer.keys[..., :prompt_len, :], layer.values[..., :prompt_len, :])
            for layer in prompt_cache.layers[: adapter.num_layers]
        ]
    )
    rows = sequences.shape[0]
    attention_mask = torch.cat(
        [enc.inputs["attention_mask"].repeat_interleave(group, dim=0), sequences.new_ones(rows, 1)], dim=1
    )
    # Every per-row input but the pixels (the image is already in the cache): token types for
    # PaliGemma's prefix mask, M-RoPE's grid and token types for Qwen2-VL. A per-token input gets the
    # first token's value, the family's fact (FamilySpec.generated_token_types).
    generated_types = adapter.spec.generated_token_types
    extra = {}
    for name, value in enc.inputs.items():
        if name in ("input_ids", "attention_mask") or name.startswith("pixel_values"):
            continue
        value = value.repeat_interleave(group, dim=0)
        if name in generated_types:
            value = torch.cat([value, value.new_full((rows, 1), generated_types[name])], dim=1)
        extra[name] = value
    saved = _expand_state(model, adapter.spec.decode_state, group)
    try:
        with torch.no_grad(), shared_prefix(adapter, cache) as state:
            out = model.generate(
                input_ids=sequences,
                attention_mask=attention_mask,
                cache=cache,
                **extra,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([processor]),
                return_dict_in_generate=True,
                pad_token_id=adapter.tokenizer.pad_token_id,
            )
    finally:
        _restore_state(model, saved)
    require_every_layer(adapter, state.served, SHARED_PREFIX_BACKEND)
    return out.sequences
