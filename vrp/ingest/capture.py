"""One forward pass -> every signal, without eager attention.

What this module offers:

* :func:`capture_attention` - a context manager that swaps the model's attention for SDPA plus
  a float32 computation of *only* the answer position's attention rows (never T x T).
* :class:`TraceModules` - forward hooks on decoder layers, attention and MLP outputs that keep
  the answer position only and always remove themselves.
* :class:`EvidenceMaps` - forward hooks on decoder layers that project the image positions'
  residuals through the final norm and unembedding (the logit lens on the patch grid) as the
  prefill passes, keeping a few logits per position, never the residuals.
* :func:`capture_batch` - runs one batch: prefill with all of the above active, the greedy
  answer and the K self-consistency samples decoded from the same prefill in one loop
  (vrp.ingest.generate), and every per-layer signal of docs/ARCHITECTURE.md section 4.

Usage::

    enc = adapter.encode(images, questions)
    result = capture_batch(adapter, enc, ["yes", "no"])  # yes/no labels, or samples of any task
    result.samples[0]["p_yes"], result.layers[0]  # numpy in, numbers out

The engine never branches on the model family: everything family-specific comes from the
adapter (module paths, image-token positions, patch grid, final norm). Nor on the kind of
answer: the truth token, the task's own first-token statistics, parsing and scoring come from
the task (``vrp.tasks``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vrp.metrics.attention import (
    cluster_count,
    cluster_counts,
    normalise_map,
    normalised_entropy,
    spatial_entropies,
    spatial_entropy,
)
from vrp.metrics.grids import Layout, grid_maps, grid_values, stitch_attention, stitch_evidence
from vrp.tasks import Gold, Task, get_task
from vrp.tasks.base import as_gold

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedModel
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from vrp.ingest.generate import Decoded
    from vrp.ingest.models.base import Adapter, Encoded

State = TypeVar("State")

ATTENTION_BACKEND = "vrp_sdpa"
"""Name under which the capturing attention is registered with transformers."""

_ACTIVE: contextvars.ContextVar[_AttentionRows | None] = contextvars.ContextVar("vrp_attention", default=None)


@dataclass
class _AttentionRows:
    """Per-forward state of the capturing attention: which modules, which query rows, results."""

    layer_of: dict[int, int]  # id(attention module) -> decoder layer index
    answer_pos: torch.Tensor  # [B]
    prompt_len: int
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, S] float32


def _capturing_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for the model's own output; on the prefill, also the answer rows' softmax in float32.

    The queries and keys arrive already rotated (RoPE, Qwen2-VL's M-RoPE) and the mask is the
    family's own (causal, PaliGemma's bidirectional prefix, padding), so the rows computed here
    are exactly eager attention's, for one query per sample instead of T.
    """
    state = _ACTIVE.get()
    layer = None if state is None else state.layer_of.get(id(module))
    if layer is not None and query.shape[2] == state.prompt_len and layer not in state.rows:
        state.rows[layer] = _answer_rows(module, query, key, attention_mask, state.answer_pos, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _answer_rows(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_pos: torch.Tensor,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Softmax(q_pos . K^T * scale + mask) for each row's answer position: [B, H, S] float32."""
    batch = torch.arange(query.shape[0], device=query.device)
    pos = answer_pos.to(query.device)
    q = query[batch, :, pos].float()  # [B, H, D]
    k = key.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        k = k.repeat_interleave(groups, dim=1)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", 1.0 / math.sqrt(q.shape[-1]))
    scores = torch.einsum("bhd,bhsd->bhs", q, k) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_index = torch.arange(k.shape[2], device=q.device)
    if attention_mask is None:  # SDPA skipped the mask: plain causal attention without padding
        allowed = key_index[None, :] <= pos[:, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[batch, 0, pos][:, : k.shape[2]]
    else:  # additive float mask (eager-style)
        scores = scores + attention_mask[batch, 0, pos][:, None, : k.shape[2]].float()
        allowed = torch.ones_like(scores[:, 0], dtype=torch.bool)
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


AttentionInterface.register(ATTENTION_BACKEND, _capturing_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_BACKEND, sdpa_mask)


def attention_layer_index(adapter: Adapter) -> dict[int, int]:
    """id(attention module) -> decoder layer index, how a registered attention function knows its layer."""
    return {id(adapter.attn(i)): i for i in range(adapter.num_layers)}


@contextlib.contextmanager
def route_attention(
    model: PreTrainedModel, backend: str, active: contextvars.ContextVar[State | None], state: State
) -> Iterator[State]:
    """Run the model's attention through the registered ``backend`` with ``state`` active in ``active``.

    The previous attention implementation is restored on exit, also on error.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(backend)
    token = active.set(state)
    try:
        yield state
    finally:
        active.reset(token)
        model.set_attn_implementation(previous)


def require_every_layer(adapter: Adapter, seen: Iterable[int], backend: str) -> None:
    """Raise unless every decoder layer's attention ran through ``backend``.

    A model whose attention bypasses transformers' AttentionInterface would silently skip VRP's
    function; what it computed is then not what VRP claims.
    """
    missing = sorted(set(range(adapter.num_layers)) - set(seen))
    if missing:
        raise RuntimeError(
            f"the attention of decoder layers {missing} did not run through VRP's {backend!r} attention; "
            "this model's attention does not use transformers' AttentionInterface"
        )


def capture_attention(
    adapter: Adapter, answer_pos: torch.Tensor, prompt_len: int
) -> AbstractContextManager[_AttentionRows]:
    """Route the model's attention through :func:`_capturing_sdpa` for the duration of the block.

    The model keeps computing its outputs with SDPA.
    """
    state = _AttentionRows(
        layer_of=attention_layer_index(adapter), answer_pos=answer_pos, prompt_len=prompt_len
    )
    return route_attention(adapter.model, ATTENTION_BACKEND, _ACTIVE, state)


class ForwardHooks:
    """Base of VRP's forward-hook context managers: installs the hooks on enter, removes them on exit.

    Usage::

        class Record(ForwardHooks):
            def _targets(self):
                yield self.module, lambda _m, _i, output: self.seen.append(output)

        with Record() as rec:
            model(**inputs)

    A subclass only says which module gets which hook (``_targets``); every handle is removed on
    exit, in reverse order, also on error and also when installing a later hook failed.
    """

    def _targets(self) -> Iterable[tuple[torch.nn.Module, Callable[..., Any]]]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for module, hook in self._targets():
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()


class TraceModules(ForwardHooks):
    """Forward hooks that keep each traced module's output at the answer position only.

    Usage::

        with TraceModules({"resid": layers, "mlp_out": mlps}, answer_pos, prompt_len) as trace:
            model(**inputs)
        trace.values["resid"][3]  # [B, hidden] float32, after decoder layer 3

    Only the prefill (sequence length == prompt_len) is recorded, once per module, so decoding
    steps that follow in the same block never mix into the list (a defect of the study's code).
    """

    def __init__(
        self, sites: dict[str, Sequence[torch.nn.Module]], answer_pos: torch.Tensor, prompt_len: int
    ) -> None:
        self.sites = sites
        self.answer_pos = answer_pos
        self.prompt_len = prompt_len
        self.values: dict[str, dict[int, torch.Tensor]] = {name: {} for name in sites}

    def _targets(self) -> Iterator[tuple[torch.nn.Module, Callable[..., Any]]]:
        for name, modules in self.sites.items():
            for index, module in enumerate(modules):
                yield module, self._hook(name, index)

    def _hook(self, name: str, index: int):
        store = self.values[name]

        def hook(
            _module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor | tuple
        ) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != self.prompt_len or index in store:
                return
            batch = torch.arange(hidden.shape[0], device=hidden.device)
            store[index] = hidden[batch, self.answer_pos.to(hidden.device)].detach().float()

        return hook


class EvidenceMaps(ForwardHooks):
    """Forward hooks that turn each decoder layer's image-position residuals into logit-lens evidence.

    Usage::

        with EvidenceMaps(adapter, enc.image_pos, candidates, prompt_len, layers=[0, 3]) as ev:
            model(**enc.inputs)
        ev.maps(truth_ids)[b][3]  # [n_image_tokens] float32: truth logit minus the vocabulary mean

    The evidence at image position p and layer l is the logit lens of the residual there
    (h_l -> the model's final norm -> unembedding): the truth token's logit minus the mean logit
    over the vocabulary, the per-patch "does the hidden state already hold the answer" map.
    The truth token is only known once the prefill has produced the answer position's logits, so
    each hook keeps the logits of every *candidate* truth token (a handful) and the mean: the mean
    logit is linear in the normed residual, so it is one dot product with the unembedding's mean
    row, never a vocabulary-wide matrix. Residuals are dropped as soon as the layer is projected.
    Only the prefill (sequence length == prompt_len) is recorded, once per layer.
    """

    def __init__(
        self,
        adapter: Any,
        image_pos: Sequence[torch.Tensor],
        candidates: Sequence[int],
        prompt_len: int,
        *,
        layers: Sequence[int],
    ) -> None:
        self.adapter = adapter
        self.prompt_len = prompt_len
        self.layers = list(layers)
        self.candidates = list(candidates)
        self.rows = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(image_pos)])
        self.cols = torch.cat([p.cpu().long() for p in image_pos])
        self.counts = [len(p) for p in image_pos]
        unembedding = adapter.unembedding()
        weight = unembedding.weight.detach()
        self._w = weight[self.candidates].float()  # [C, d]
        # accumulated in float32 without a float32 copy of the whole unembedding (V x d)
        self._w_mean = weight.sum(0, dtype=torch.float32) / weight.shape[0]  # [d]
        bias = getattr(unembedding, "bias", None)
        self._b = None if bias is None else bias.detach()[self.candidates].float()
        self._b_mean = None if bias is None else bias.detach().float().mean()
        self.values: dict[int, torch.Tensor] = {}  # layer -> [sum of image tokens, C] truth-minus-mean

    def _targets(self) -> Iterator[tuple[torch.nn.Module, Callable[..., Any]]]:
        layers = self.adapter.decoder_layers()
        for index in self.layers:
            yield layers[index], self._hook(index)

    def _hook(self, index: int):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != self.prompt_len or index in self.values:
                return
            image = hidden[self.rows.to(hidden.device), self.cols.to(hidden.device)]  # [sum N, d]
            normed = self.adapter.final_norm()(image).float()
            logits = normed @ self._w.to(normed.device).T  # [sum N, C]
            mean = normed @ self._w_mean.to(normed.device)  # [sum N]
            if self._b is not None:
                logits = logits + self._b.to(normed.device)
                mean = mean + self._b_mean.to(normed.device)
            self.values[index] = (logits - mean[:, None]).cpu()

        return hook

    def maps(self, truth_ids: Sequence[int]) -> list[dict[int, np.ndarray]]:
        """Per sample, layer -> [n_image_tokens] float32 evidence for that sample's truth token.

        A sample whose truth id is -1 (no right answer) gets no maps.
        """
        missing = sorted(set(self.layers) - set(self.values))
        if missing:
            raise RuntimeError(f"evidence maps: decoder layers {missing} did not run on the prefill")
        out: list[dict[int, np.ndarray]] = []
        start = 0
        for b, count in enumerate(self.counts):
            truth = int(truth_ids[b])
            if truth < 0:  # no right answer to look for (its truth columns are null too)
                out.append({})
                start += count
                continue
            if truth not in self.candidates:
                raise RuntimeError(
                    f"truth token {truth} is not among the evidence candidates {self.candidates}; "
                    "the task's truth_candidates() must list every token its truth_ids() can choose"
                )
            column = self.candidates.index(truth)
            out.append(
                {
                    layer: self.values[layer][start : start + count, column].numpy().astype(np.float32)
                    for layer in self.layers
                }
            )
            start += count
        return out


@dataclass(frozen=True)
class GridMap:
    """One grid's attention map at one layer and its summaries: an ``attention_maps`` row (4.1b)."""

    map: np.ndarray  # [rows * cols] float32, renormalised to sum to 1
    mass: float  # the grid's raw head-mean mass, on the scale of image_mass
    entropy: float
    entropy_norm: float | None
    clusters: int


@dataclass
class BatchCapture:
    """Everything one batch produced, as plain numpy / python values per sample."""

    samples: list[dict[str, Any]]  # first-token statistics, answer, attention summary
    layers: list[list[dict[str, Any]]]  # per sample, per layer
    heads: list[list[dict[str, Any]]]  # per sample, per (layer, head)
    maps: list[list[np.ndarray]]  # per sample, per layer: head-mean map (grid_h * grid_w), sums to 1
    hidden: list[dict[str, np.ndarray]]  # per sample: site -> [layers, hidden] float32
    nonfinite: list[str | None] = field(default_factory=list)  # per sample: which signal was NaN/inf
    sampled: list[list[str]] = field(default_factory=list)  # per sample: its K self-consistency texts
    greedy_tokens: torch.Tensor | None = None  # [B, new] answer token ids
    first_logits: torch.Tensor | None = None  # [B, V] float32 next-token logits at the answer position
    # per sample: layer -> float32 logit-lens evidence on the stitched lattice (empty when not asked for)
    evidence: list[dict[int, np.ndarray]] = field(default_factory=list)
    # per sample: its grids (one for single-grid families; docs/ARCHITECTURE.md section 4.1b)
    layouts: list[Layout | None] = field(default_factory=list)
    # multi-grid samples only, per sample, per layer: each grid's map and its summaries
    grid_maps: list[list[list[GridMap]]] = field(default_factory=list)
    # multi-grid samples only, per sample: layer -> each grid's float32 evidence
    grid_evidence: list[dict[int, list[np.ndarray]]] = field(default_factory=list)


def first_token_stats(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Task-free first-token statistics (docs/ARCHITECTURE.md section 4) from next-token logits [B, V]."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    top2 = torch.topk(logits, 2, dim=-1).values
    return {
        "top1_prob": probs.max(-1).values.cpu().numpy(),
        "top2_margin": (top2[:, 0] - top2[:, 1]).cpu().numpy(),
        "token_entropy": (-(probs * logp).nan_to_num(0.0).sum(-1)).cpu().numpy(),
    }


def first_token_truth(logits: torch.Tensor, truth_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The truth token's first-token statistics from next-token logits [B, V] and truth ids [B].

    ``truth_prob`` is its softmax probability, ``truth_margin`` its logit minus the best other
    logit (positive exactly when greedy decoding starts with it), ``truth_rank`` how many tokens
    score above it (0 = the greedy token).
    """
    logits = logits.float()
    truth_ids = truth_ids.to(logits.device)
    batch = torch.arange(logits.shape[0], device=logits.device)
    truth = logits[batch, truth_ids]
    others = logits.clone()
    others[batch, truth_ids] = float("-inf")
    return {
        "truth_prob": torch.log_softmax(logits, dim=-1).exp()[batch, truth_ids].double(),
        "truth_margin": (truth - others.max(-1).values).double(),
        "truth_rank": (logits > truth[:, None]).sum(-1),
    }


def _final_norm_scale(adapter: Adapter, h_last: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm as a per-sample diagonal map: weight(+offset) / rms(h_last). [B, d]

    Linearising the norm at the last residual makes direct contributions additive: the
    contributions of every attention and MLP output plus the embedding sum to the logit.
    """
    norm = adapter.final_norm()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    rms = torch.sqrt(h_last.pow(2).mean(-1, keepdim=True) + eps)
    return adapter.final_norm_scale()[None, :] / rms


def logit_lens(adapter: Adapter, resid: torch.Tensor) -> torch.Tensor:
    """Layer-wise logits: h_l -> the model's final norm -> unembedding. resid [L, B, d] -> [L, B, V]."""
    return lens_logits(adapter, resid).float()


def lens_logits(adapter: Adapter, resid: torch.Tensor) -> torch.Tensor:
    """:func:`logit_lens` in the model's dtype: [L, B, V] float32 copies of it are made a layer at a time."""
    param = next(adapter.unembedding().parameters())
    with torch.no_grad():
        normed = adapter.final_norm()(resid.to(param.dtype))
        return adapter.unembedding()(normed)


def capture_batch(
    adapter: Adapter,
    enc: Encoded,
    golds: Sequence[Gold | str],
    *,
    task: Task | None = None,
    images: Sequence[Image.Image] | None = None,
    questions: Sequence[str] | None = None,
    max_new_tokens: int = 8,
    seeds: Sequence[Sequence[int]] | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    evidence_layers: Sequence[int] | None = None,
) -> BatchCapture:
    """Prefill once with every capture active, then decode the greedy answer and its samples.

    `golds` are the samples (or bare yes/no labels); `task` defaults to yes/no. `images` and
    `questions` (as encoded) are needed by tasks whose truth token is teacher-forced.
    ``seeds[b]``: the K self-consistency seeds of row b (``sample_seed``), drawn at ``temperature``
    and ``top_p``; None samples nothing. The greedy answer and the samples decode in one loop from
    the prefill (:func:`vrp.ingest.generate.decode_answers`); the texts land in ``sampled``.
    ``evidence_layers``: the decoder layers whose logit-lens evidence maps are computed in the same
    prefill (:class:`EvidenceMaps`), for the task's truth token; None computes none.
    """
    # local: vrp.ingest.generate builds its decode loop on this module's attention routing (a real cycle)
    from vrp.ingest.generate import decode_answers

    task = task if task is not None else get_task("yesno")
    golds = [as_gold(g) for g in golds]
    prompt_len = int(enc.inputs["input_ids"].shape[1])
    answer_pos = enc.answer_pos
    sites = {
        "resid": adapter.decoder_layers(),
        "mlp_out": [adapter.mlp_out(i) for i in range(adapter.num_layers)],
        "attn_out": [adapter.attn_out(i) for i in range(adapter.num_layers)],
    }
    evidence = contextlib.nullcontext()
    if evidence_layers is not None:
        candidates = task.truth_candidates(adapter, images or [], questions or [], golds)
        evidence = EvidenceMaps(adapter, enc.image_pos, candidates, prompt_len, layers=evidence_layers)
    with (
        torch.no_grad(),
        capture_attention(adapter, answer_pos, prompt_len) as attn,
        TraceModules(sites, answer_pos, prompt_len) as trace,
        evidence as ev,
    ):
        prefill = prefill_one_token(adapter, enc)
    require_every_layer(adapter, attn.rows, ATTENTION_BACKEND)
    decoded = decode_answers(
        adapter,
        enc,
        prefill,
        seeds if seeds is not None else [[] for _ in golds],
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
    )
    del prefill  # its cache: the prompt's keys and values of every layer
    truth_ids = task.truth_ids(adapter, images or [], questions or [], golds, decoded.logits[0])
    result = _summarise(adapter, enc, task, golds, truth_ids, attn.rows, trace.values, decoded)
    result.sampled = decoded.sampled
    if ev is not None:
        tokens = ev.maps(truth_ids.tolist())  # per sample: layer -> [n_image_tokens]
        result.evidence = [
            {layer: _whole_image_evidence(values, layout) for layer, values in maps.items()}
            for maps, layout in zip(tokens, result.layouts, strict=True)
        ]
        result.grid_evidence = [
            {
                layer: [v.astype(np.float32) for v in grid_values(values, layout)]
                for layer, values in maps.items()
            }
            if layout is not None and layout.multi
            else {}
            for maps, layout in zip(tokens, result.layouts, strict=True)
        ]
        for b, maps in enumerate(result.evidence):
            bad = [layer for layer, values in maps.items() if not np.isfinite(values).all()]
            if bad and result.nonfinite[b] is None:
                result.nonfinite[b] = f"evidence map at layer {bad[0]}"
    return result


def prefill_one_token(adapter: Adapter, enc: Encoded) -> GenerateDecoderOnlyOutput:
    """The prompt's prefill and the first answer token, as ``decode_answers`` (vrp.ingest.generate) needs it.

    ``generate`` with one new token picks it by the model's own greedy rule over its generation
    config's logits processors, and returns the raw first-step logits and the cache. A cache built
    without the config keeps every key, also in sliding-window layers (whose window the model's
    mask applies), so the decode loop reads the whole prompt's keys. :func:`capture_batch` runs it
    with every capture active.
    """
    with torch.no_grad():
        return adapter.model.generate(
            **enc.inputs,
            cache=DynamicCache(),
            do_sample=False,
            max_new_tokens=1,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )


def _whole_image_evidence(values: np.ndarray, layout: Layout | None) -> np.ndarray:
    """Per-image-token evidence as one float32 map over the whole image (unchanged for one grid)."""
    if layout is None or not layout.multi:
        return values
    return stitch_evidence(values, layout).astype(np.float32)


def _row_layout(enc: Encoded, b: int) -> Layout | None:
    """Row ``b``'s grids; None for a text-only row (no image tokens, no grid)."""
    if len(enc.image_pos[b]) == 0:
        return None
    if enc.layouts:
        return enc.layouts[b]
    return Layout.single(*enc.grids[b])


def _summarise(
    adapter: Adapter,
    enc: Encoded,
    task: Task,
    golds: Sequence[Gold],
    truth_ids: torch.Tensor,
    attn_rows: dict[int, torch.Tensor],
    traced: dict[str, dict[int, torch.Tensor]],  # site -> layer -> [B, d]
    decoded: Decoded,
) -> BatchCapture:
    n_layers = adapter.num_layers
    resid = torch.stack([traced["resid"][i] for i in range(n_layers)])  # [L, B, d]
    mlp_out = torch.stack([traced["mlp_out"][i] for i in range(n_layers)])
    attn_out = torch.stack([traced["attn_out"][i] for i in range(n_layers)])
    first_logits = decoded.logits[0]  # [B, V] float32: the model's next-token logits at the answer position
    lens = lens_logits(adapter, resid)  # [L, B, V] in the model's dtype

    stats = {**task.token_stats(adapter, first_logits), **first_token_stats(first_logits)}
    new_tokens = decoded.tokens
    texts = adapter.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    answer_logprob = _answer_logprob(decoded.logits, new_tokens, adapter)
    first_token = first_logits.argmax(-1)  # [B]
    truth_ids = truth_ids.to(first_token.device)
    has_truth = truth_ids >= 0  # a sample without a right answer keeps its truth columns null
    truth_ids = torch.where(has_truth, truth_ids, first_token)
    scale = _final_norm_scale(adapter, resid[-1])  # [B, d]
    # the truth rows alone in float32, never a float32 copy of the whole unembedding (V x d)
    w_truth = adapter.unembedding().weight.detach()[truth_ids.to(resid.device)].float()  # [B, d]
    attn_contrib = ((attn_out * scale[None]) * w_truth[None]).sum(-1)  # [L, B]
    mlp_contrib = ((mlp_out * scale[None]) * w_truth[None]).sum(-1)

    # One layer at a time in float32: the [L, B, V] float32 lens and its copies are what made the
    # capture's memory grow with the vocabulary (Gemma 3's 262k tokens x 34 layers).
    batch = torch.arange(first_logits.shape[0], device=lens.device)
    truth_ids = truth_ids.to(lens.device)
    lens_stats, margins, truth_ranks, answer_ranks = [], [], [], []
    for layer in range(n_layers):
        logits = lens[layer].float()  # [B, V]
        lens_stats.append({**task.lens_stats(adapter, logits), **first_token_stats(logits)})
        truth_logit = logits[batch, truth_ids]  # [B]
        others = logits.clone()
        others[batch, truth_ids] = float("-inf")
        margins.append(truth_logit - others.max(-1).values)
        truth_ranks.append((logits > truth_logit[:, None]).sum(-1))  # 0 = the lens's top token
        answer_ranks.append((logits > logits[batch, first_token][:, None]).sum(-1))
    truth_margin, truth_rank, answer_rank = (
        torch.stack(margins),
        torch.stack(truth_ranks),
        torch.stack(answer_ranks),
    )
    first = first_token_truth(first_logits, truth_ids)
    # One copy to the host per tensor (tolist, cpu; no-ops on CPU), not one device sync per number:
    # python numbers per layer and sample, and every layer's answer rows as [B, L, H, S] float32.
    per_layer = {
        "truth_margin": truth_margin.tolist(),
        "truth_rank": truth_rank.tolist(),
        "answer_rank": answer_rank.tolist(),
        "attn_contrib": attn_contrib.tolist(),
        "mlp_contrib": mlp_contrib.tolist(),
    }
    lens_host = [{key: values.tolist() for key, values in layer.items()} for layer in lens_stats]
    has_truth = has_truth.cpu()
    first = {key: values.cpu() for key, values in first.items()}
    resid, mlp_out = resid.cpu(), mlp_out.cpu()
    rows_host = torch.stack([attn_rows[layer] for layer in range(n_layers)], dim=1).cpu()

    result = BatchCapture(samples=[], layers=[], heads=[], maps=[], hidden=[])
    for b, gold in enumerate(golds):
        pos = enc.image_pos[b].cpu()
        grid_h, grid_w = enc.grids[b]
        layout = _row_layout(enc, b)
        answer, status = task.parse(texts[b])
        correct, score = task.score(answer, gold)
        truth = bool(has_truth[b])
        has_image = layout is not None  # a text-only prompt (the `none` condition) has no map to summarise
        summary = None
        if has_image:
            summary = _attention_summary(rows_host[b][:, :, pos].double().numpy(), layout)
        maps = [] if summary is None else list(summary.maps)
        layer_rows, head_rows = [], []
        for layer in range(n_layers):
            layer_rows.append(
                {
                    "layer": layer,
                    "image_mass": summary.image_mass[layer] if summary is not None else None,
                    "spatial_entropy": summary.entropy[layer] if summary is not None else None,
                    "spatial_entropy_norm": summary.entropy_norm[layer] if summary is not None else None,
                    "cluster_count": summary.clusters[layer] if summary is not None else None,
                    **{c: lens_host[layer][c][b] for c in task.lens_columns},
                    "lens_truth_margin": per_layer["truth_margin"][layer][b] if truth else None,
                    "lens_answer_rank": per_layer["answer_rank"][layer][b],
                    "lens_entropy": lens_host[layer]["token_entropy"][b],
                    "attn_contrib": per_layer["attn_contrib"][layer][b] if truth else None,
                    "mlp_contrib": per_layer["mlp_contrib"][layer][b] if truth else None,
                    "lens_truth_rank": per_layer["truth_rank"][layer][b] if truth else None,
                }
            )
            if has_image:
                head_rows.extend(
                    {
                        "layer": layer,
                        "head": head,
                        "image_mass": mass,
                        "spatial_entropy": entropy,
                        "spatial_entropy_norm": entropy_norm,
                    }
                    for head, (mass, entropy, entropy_norm) in enumerate(
                        zip(
                            summary.head_mass[layer],
                            summary.head_entropy[layer],
                            summary.head_entropy_norm[layer],
                            strict=True,
                        )
                    )
                )
        mean_map = normalise_map(np.mean(maps, axis=0)).reshape(grid_h, grid_w) if has_image else None
        mean_entropy = spatial_entropy(mean_map) if has_image else None
        image_h, image_w = enc.original_sizes[b]  # the picture as loaded, before the processor
        sample = {
            "answer_text": texts[b],
            "answer": answer,
            "parse_status": status,
            "correct": correct,
            "score": score,
            **{key: float(values[b]) for key, values in stats.items()},
            "answer_logprob": float(answer_logprob[b]),
            **{key: values[b].item() if truth else None for key, values in first.items()},
            "n_image_tokens": int(len(pos)),
            "grid_h": int(grid_h) if has_image else None,
            "grid_w": int(grid_w) if has_image else None,
            "n_grids": len(layout.grids) if has_image else None,
            "image_h": int(image_h) if has_image else None,
            "image_w": int(image_w) if has_image else None,
            "spatial_entropy": mean_entropy,
            "spatial_entropy_norm": normalised_entropy(mean_entropy, mean_map.size) if has_image else None,
            "cluster_count": cluster_count(mean_map) if has_image else None,
        }
        hidden = {"resid": resid[:, b].numpy(), "mlp_out": mlp_out[:, b].numpy()}
        result.samples.append(sample)
        result.layers.append(layer_rows)
        result.heads.append(head_rows)
        result.maps.append(maps)
        result.layouts.append(layout)
        result.grid_maps.append([] if summary is None else summary.grids)
        result.hidden.append(hidden)
        result.nonfinite.append(_first_nonfinite(sample, layer_rows, head_rows, maps, hidden))
    result.greedy_tokens = new_tokens
    result.first_logits = first_logits
    return result


@dataclass
class _MapSummary:
    """One sample's attention summaries over its image tokens, per layer and per (layer, head)."""

    maps: np.ndarray  # [L, N] float32 head-mean maps, each renormalised to sum to 1
    image_mass: list[float]  # [L] the head-mean row's mass on image tokens
    entropy: list[float]  # [L] H_s of each layer's map
    entropy_norm: list[float | None]  # [L] H_s / ln N
    clusters: list[int]  # [L] C_k of each layer's map
    head_mass: list[list[float]]  # [L][H]
    head_entropy: list[list[float]]  # [L][H]
    head_entropy_norm: list[list[float | None]]  # [L][H]
    # several grids only, per layer: each grid's map and summaries (4.1b); else empty
    grids: list[list[GridMap]]


def _attention_summary(image: np.ndarray, layout: Layout) -> _MapSummary:
    """Every per-layer and per-head attention summary of one sample, as whole-array operations.

    ``image`` is [L, H, N] float64, the answer rows' raw probabilities on the image tokens. The
    arithmetic is the per-map definitions' (vrp.metrics.attention) applied along the last axis,
    so each number is the one the per-map functions give (docs/ARCHITECTURE.md 4.1). Maps are on
    the layout's stitched lattice: for one grid that is the renormalised row itself (4.1b).
    """
    n_layers = image.shape[0]
    grid_h, grid_w = layout.stitched
    n_cells = grid_h * grid_w
    head_maps = stitch_attention(image, layout)  # [L, H, cells]
    mean_raw = image.mean(1)  # [L, N]
    layer_maps = stitch_attention(mean_raw, layout)
    per_grid: list[list[GridMap]] = [[] for _ in range(n_layers)] if layout.multi else []
    if layout.multi:
        tiles, masses = grid_maps(mean_raw, layout)  # per grid [L, cells], masses [L, n_grids]
        for g, (grid, tile) in enumerate(zip(layout.grids, tiles, strict=True)):
            tile_entropy = spatial_entropies(tile)
            tile_clusters = cluster_counts(tile.reshape(n_layers, grid.rows, grid.cols)).tolist()
            for layer in range(n_layers):
                per_grid[layer].append(
                    GridMap(
                        map=tile[layer].astype(np.float32),
                        mass=float(masses[layer, g]),
                        entropy=float(tile_entropy[layer]),
                        entropy_norm=normalised_entropy(float(tile_entropy[layer]), grid.size),
                        clusters=int(tile_clusters[layer]),
                    )
                )
    entropy = spatial_entropies(layer_maps)
    head_entropy = spatial_entropies(head_maps)
    log_cells = np.log(n_cells) if n_cells >= 2 else None  # normalised_entropy: None for one cell
    return _MapSummary(
        maps=layer_maps.astype(np.float32),
        image_mass=mean_raw.sum(-1).tolist(),
        entropy=entropy.tolist(),
        entropy_norm=[None] * n_layers if log_cells is None else (entropy / log_cells).tolist(),
        clusters=cluster_counts(layer_maps.reshape(n_layers, grid_h, grid_w)).tolist(),
        head_mass=image.sum(-1).tolist(),
        head_entropy=head_entropy.tolist(),
        head_entropy_norm=(
            [[None] * image.shape[1]] * n_layers if log_cells is None else (head_entropy / log_cells).tolist()
        ),
        grids=per_grid,
    )


def _answer_logprob(
    step_logits: Sequence[torch.Tensor], new_tokens: torch.Tensor, adapter: Adapter
) -> np.ndarray:
    """Mean log-probability of the greedy answer's tokens, stopping at the first end token."""
    end_ids = end_token_ids(adapter)
    # step by step: one [B, V] log-softmax at a time, never all steps' [B, N, V] at once
    chosen = torch.stack(
        [
            torch.log_softmax(step.float(), -1).gather(-1, new_tokens[:, i, None]).squeeze(-1)
            for i, step in enumerate(step_logits)
        ],
        dim=1,
    )  # [B, N]
    values = []
    for b in range(new_tokens.shape[0]):
        tokens = new_tokens[b].tolist()
        length = next((i for i, t in enumerate(tokens) if t in end_ids), len(tokens))
        values.append(float(chosen[b, : max(length, 1)].mean()))
    return np.asarray(values)


def eos_token_ids(adapter: Adapter) -> set[int]:
    """The ids on which transformers' generate ends a row: the generation config's EOS (one or several)."""
    eos = adapter.model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def end_token_ids(adapter: Adapter) -> set[int]:
    """Token ids that end an answer: EOS (:func:`eos_token_ids`) and padding."""
    ids = eos_token_ids(adapter)
    if adapter.tokenizer.pad_token_id is not None:
        ids.add(adapter.tokenizer.pad_token_id)
    return ids


def _first_nonfinite(
    sample: dict[str, Any],
    layer_rows: list[dict[str, Any]],
    head_rows: list[dict[str, Any]],
    maps: list[np.ndarray],
    hidden: dict[str, np.ndarray],
) -> str | None:
    """Name the captured signal where a NaN or inf first appears (earliest layer first), or None.

    Hidden states are checked first: a NaN born in layer l spreads to every later signal, so the
    earliest non-finite residual is where to look. The rows are only searched when some value is
    not finite (the common case returns after a few whole-array checks).
    """
    numbers = [v for row in (sample, *layer_rows, *head_rows) for v in row.values() if isinstance(v, float)]
    if (
        all(np.isfinite(values).all() for values in hidden.values())
        and all(np.isfinite(values).all() for values in maps)
        and np.isfinite(np.asarray(numbers, dtype=np.float64)).all()
    ):
        return None
    for site, values in hidden.items():
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            return f"hidden {site} at layer {int(np.argmax(bad))}"
    for layer, values in enumerate(maps):
        if not np.isfinite(values).all():
            return f"attention map at layer {layer}"
    for row in layer_rows + head_rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"{key} at layer {row['layer']}"
    for key, value in sample.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"samples.{key}"
    return None
