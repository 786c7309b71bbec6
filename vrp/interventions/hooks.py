"""Hooks the intervention kinds edit the model with; each a context manager that always cleans up.

What this module offers:

* :class:`EditOutput` - overwrite chosen coordinates of a module's output at every position and
  row with one constant (zero or given values): neuron ablation and the destruction sweep.
* :class:`RecordOutputs` - keep whole prefill outputs ``[B, T, d]`` of some modules (a donor's
  activations for patching).
* :class:`PatchRows` - write per-row vectors at per-row positions of a module's prefill output
  (activation patching: row b gets its own donor's vectors).
* :func:`knock_out_image_attention` - route attention through SDPA with the mask entries from the
  answer (or every text) position to the image tokens removed, in chosen layers.

Every hook removes exactly its own handles (or restores the attention implementation) on exit,
also on error, so a failed batch never leaves a model edited.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vrp.ingest.capture import ForwardHooks, attention_layer_index, route_attention
from vrp.ingest.models.base import Adapter, Encoded


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class EditOutput(ForwardHooks):
    """Overwrite chosen coordinates of a module's output at every position while the block runs.

    Usage::

        with EditOutput(adapter.mlp(3), [17, 40]):               # zero coordinates 17 and 40
            logits = adapter.model(**enc.inputs).logits
        with EditOutput(adapter.mlp(3), [17, 40], values=means):  # mean-replace them instead

    The hook replaces the output (a fresh tensor, the module's own output is not modified) on every
    forward, so prefill and every decoding step are edited alike; it is removed on exit, also on error.
    """

    def __init__(
        self, module: torch.nn.Module, coords: Sequence[int], values: Sequence[float] | None = None
    ) -> None:
        self.module = module
        self.coords = torch.as_tensor(list(coords), dtype=torch.long)
        self.values = None if values is None else torch.as_tensor(list(values), dtype=torch.float32)
        if self.values is not None and self.values.shape != self.coords.shape:
            raise ValueError(f"{self.values.numel()} values for {self.coords.numel()} coordinates")

    def _targets(self) -> Iterator[tuple[torch.nn.Module, Callable[..., Any]]]:
        yield self.module, self._hook

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _hidden(output)
        if self.coords.numel() == 0:
            return output
        coords = self.coords.to(hidden.device)
        edited = hidden.clone()
        if self.values is None:
            edited[..., coords] = 0
        else:
            edited[..., coords] = self.values.to(hidden.device, hidden.dtype)
        return _replace(output, edited)


class RecordOutputs(ForwardHooks):
    """Keep the whole prefill output of each module (the first call whose length is ``prompt_len``).

    Usage::

        with RecordOutputs({3: adapter.mlp(3)}, prompt_len) as rec:
            adapter.model(**enc.inputs)
        rec.values[3]  # [B, T, d], detached, in the model's dtype

    Decoding steps (length 1) that follow in the same block are ignored.
    """

    def __init__(self, modules: dict[int, torch.nn.Module], prompt_len: int) -> None:
        self.modules = modules
        self.prompt_len = prompt_len
        self.values: dict[int, torch.Tensor] = {}

    def _targets(self) -> Iterator[tuple[torch.nn.Module, Callable[..., Any]]]:
        for key, module in self.modules.items():
            yield module, self._hook(key)

    def _hook(self, key: int):  # noqa: ANN202 - a forward hook
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden = _hidden(output)
            if hidden.shape[1] == self.prompt_len and key not in self.values:
                self.values[key] = hidden.detach().clone()

        return hook


@dataclass(frozen=True)
class RowEdit:
    """Row ``row`` of the batch gets ``values[i]`` at sequence position ``positions[i]``."""

    row: int
    positions: torch.Tensor  # [n] long
    values: torch.Tensor  # [n, d]


class PatchRows(ForwardHooks):
    """Write per-row vectors into a module's prefill output: each row gets its own edit.

    Usage::

        edits = [RowEdit(0, torch.tensor([41]), donor_a), RowEdit(1, torch.tensor([39]), donor_b)]
        with PatchRows(adapter.decoder_layers()[5], edits, prompt_len):
            answers = answer_batch(adapter, enc.inputs, labels)

    Only the prefill (length ``prompt_len``) is edited; decoding steps carry the effect through the
    key/value cache, as a patch into a prompt should. Rows without an edit pass through unchanged.
    """

    def __init__(self, module: torch.nn.Module, edits: Sequence[RowEdit], prompt_len: int) -> None:
        self.module = module
        self.edits = list(edits)
        self.prompt_len = prompt_len

    def _targets(self) -> Iterator[tuple[torch.nn.Module, Callable[..., Any]]]:
        yield self.module, self._hook

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _hidden(output)
        if hidden.shape[1] != self.prompt_len or not self.edits:
            return output
        edited = hidden.clone()
        for edit in self.edits:
            edited[edit.row, edit.positions.to(hidden.device)] = edit.values.to(hidden.device, hidden.dtype)
        return _replace(output, edited)


# ----- attention knockout ------------------------------------------------------------------------------

KNOCKOUT_BACKEND = "vrp_knockout"
"""Name under which the knockout attention is registered with transformers."""

_KNOCKOUT: contextvars.ContextVar[_Knockout | None] = contextvars.ContextVar("vrp_knockout", default=None)


@dataclass
class _Knockout:
    """Which layers to edit and which (query, key) entries to remove on the prefill and after."""

    layer_of: dict[int, int]  # id(attention module) -> decoder layer
    layers: frozenset[int]
    prompt_len: int
    blocked_queries: torch.Tensor  # [B, prompt_len] bool: prefill query rows that lose the image
    image_keys: torch.Tensor  # [B, prompt_len] bool: the image-token key positions


def _knockout_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with, in the chosen layers, the blocked query rows' image-key entries removed from the mask."""
    state = _KNOCKOUT.get()
    layer = None if state is None else state.layer_of.get(id(module))
    if layer is not None and layer in state.layers:
        attention_mask = knockout_mask(state, attention_mask, query.shape[2], key.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def knockout_mask(state: _Knockout, mask: torch.Tensor | None, n_query: int, n_key: int) -> torch.Tensor:
    """A new boolean mask [B, 1, Q, K]: ``mask`` (or plain causal when SDPA skipped it) minus the knockout.

    Prefill (Q == prompt length): the blocked query rows lose every image key. A decoding step
    (one new text token): that token loses every image key too, so the whole answer, not only its
    first token, is produced without the image in these layers.
    """
    batch = state.image_keys.shape[0]
    device = state.image_keys.device
    if mask is None:  # SDPA's causal shortcut: no padding, plain causal
        q_pos = torch.arange(n_key - n_query, n_key, device=device)
        allowed = (torch.arange(n_key, device=device)[None, :] <= q_pos[:, None])[None, None]
        allowed = allowed.expand(batch, 1, n_query, n_key)
    elif mask.dtype == torch.bool:  # what `sdpa_mask`, registered for this backend, builds
        allowed = mask[..., :n_key].expand(batch, 1, n_query, n_key)
    else:
        raise TypeError(f"knockout expects a boolean attention mask, got {mask.dtype}")
    keys = torch.zeros(batch, n_key, dtype=torch.bool, device=device)
    width = min(n_key, state.image_keys.shape[1])
    keys[:, :width] = state.image_keys[:, :width]
    if n_query == state.prompt_len:
        rows = state.blocked_queries
    else:
        rows = torch.ones(batch, n_query, dtype=torch.bool, device=device)
    blocked = rows[:, None, :, None] & keys[:, None, None, :]
    return allowed & ~blocked.to(allowed.device)


AttentionInterface.register(KNOCKOUT_BACKEND, _knockout_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(KNOCKOUT_BACKEND, sdpa_mask)


def knockout_rows(enc: Encoded, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocked query rows, image keys), both [B, T] bool, for ``source`` ``answer`` or ``text``.

    ``answer``: only the answer position (the last prompt token). ``text``: every real (unpadded)
    position that is not an image token.
    """
    input_ids = enc.inputs["input_ids"]
    batch, length = input_ids.shape
    image = torch.zeros(batch, length, dtype=torch.bool)
    for row, pos in enumerate(enc.image_pos):
        image[row, pos.cpu()] = True
    if source == "answer":
        rows = torch.zeros(batch, length, dtype=torch.bool)
        rows[torch.arange(batch), enc.answer_pos.cpu()] = True
    elif source == "text":
        rows = enc.inputs["attention_mask"].cpu().bool() & ~image
    else:
        raise ValueError(f"knockout source must be answer or text, got {source!r}")
    device = input_ids.device
    return rows.to(device), image.to(device)


@contextlib.contextmanager
def knock_out_image_attention(
    adapter: Adapter, enc: Encoded, layers: Sequence[int], source: str = "answer"
) -> Iterator[None]:
    """Block attention to the image tokens from ``source`` positions in ``layers`` while the block runs.

    Usage::

        with knock_out_image_attention(adapter, enc, layers=range(0, 4), source="text"):
            answers = answer_batch(adapter, enc.inputs, labels)

    The entries are removed from the attention mask the model itself built (padding, causal and
    PaliGemma's bidirectional prefix kept), so SDPA stays the kernel; with no layers the routing
    is still active and reproduces the model bit for bit. The previous attention implementation is
    restored on exit, also on error.
    """
    blocked, image = knockout_rows(enc, source)
    state = _Knockout(
        layer_of=attention_layer_index(adapter),
        layers=frozenset(int(layer) for layer in layers),
        prompt_len=int(enc.inputs["input_ids"].shape[1]),
        blocked_queries=blocked,
        image_keys=image,
    )
    with route_attention(adapter.model, KNOCKOUT_BACKEND, _KNOCKOUT, state):
        yield
