"""Self-consistency from a shared prefill: same distribution as fresh decoding, seeded per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from transformers.cache_utils import Cache

from vrp.ingest.capture import capture_batch, end_token_ids, require_every_layer
from vrp.ingest.generate import (
    SHARED_PREFIX_BACKEND,
    SeededSampler,
    SharedPrefixLayer,
    sample_answers,
    sample_seed,
    shared_prefix,
    shared_prefix_attention,
    top_p_filter,
)
from vrp.ingest.models.registry import families

FAMILIES = tuple(fam.name for fam in families())  # every registered family
QUESTIONS = ["Is there a red circle in the image?", "Is there a square?"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tiny_adapter):
    return tiny_adapter(request.param, seed=1, num_layers=2)


def _encode(adapter, questions=QUESTIONS):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in QUESTIONS]
    return adapter.encode(images[: len(questions)], list(questions))


def _draw(adapter, seeds, return_logits=False, questions=QUESTIONS):
    enc = _encode(adapter, questions)
    cap = capture_batch(adapter, enc, ["yes", "no"][: len(questions)], max_new_tokens=2, keep_cache=True)
    texts, out = sample_answers(
        adapter, enc, cap.greedy_output, seeds, max_new_tokens=4, return_logits=return_logits, temperature=1.5
    )
    return enc, texts, out


def test_shared_prefill_logits_equal_fresh_forward(adapter) -> None:
    """At every step each unfinished sequence's logits equal a fresh pass over its whole prefix."""
    k = 3
    seeds = [[sample_seed(0, f"s{b}", i) for i in range(k)] for b in range(2)]
    enc, _texts, out = _draw(adapter, seeds, return_logits=True)
    prompt_len = enc.inputs["input_ids"].shape[1]
    rows = torch.arange(2).repeat_interleave(k)
    fresh_inputs = {
        name: value[rows] for name, value in enc.inputs.items() if not name.startswith("pixel_values")
    }
    pixel_rows = {name: value for name, value in enc.inputs.items() if name.startswith("pixel_values")}
    eos = adapter.model.generation_config.eos_token_id
    end = set(eos if isinstance(eos, list) else [eos]) | {adapter.tokenizer.pad_token_id}
    for step, step_logits in enumerate(out.logits):
        prefix = out.sequences[:, : prompt_len + step]
        unfinished = torch.tensor(
            [not (set(prefix[i, prompt_len:].tolist()) & end) for i in range(len(rows))]
        )
        inputs = dict(fresh_inputs)
        inputs["input_ids"] = prefix
        inputs["attention_mask"] = torch.cat(
            [fresh_inputs["attention_mask"], torch.ones(len(rows), step, dtype=torch.long)], dim=1
        )
        # generated tokens take the family's type (test_models.py checks it against the processor)
        for name, value in adapter.spec.generated_token_types.items():
            if name in inputs:
                new = torch.full((len(rows), step), value, dtype=inputs[name].dtype)
                inputs[name] = torch.cat([inputs[name], new], 1)
        inputs.update(_repeat_pixels(adapter, pixel_rows, enc, k))
        with torch.no_grad():
            fresh = adapter.model(**inputs).logits[:, -1].float()
        torch.testing.assert_close(step_logits.float()[unfinished], fresh[unfinished], atol=1e-5, rtol=1e-5)


def _repeat_pixels(adapter, pixel_rows, enc, k):
    """Pixels for the K-times repeated batch (Qwen2-VL's patches and InternVL's tiles of all images are
    one tensor)."""
    out = {}
    for name, value in pixel_rows.items():
        if "image_grid_thw" in enc.inputs:
            per_image = enc.inputs["image_grid_thw"].prod(-1).tolist()
            chunks = torch.split(value, per_image)
            out[name] = torch.cat([chunk for chunk in chunks for _ in range(k)])
        elif value.shape[0] != len(enc.layouts):  # InternVL: every image's tiles, one tensor per grid
            chunks = torch.split(value, [len(layout.grids) for layout in enc.layouts])
            out[name] = torch.cat([chunk for chunk in chunks for _ in range(k)])
        else:
            out[name] = value.repeat_interleave(k, dim=0)
    if "image_grid_thw" in enc.inputs:
        out["image_grid_thw"] = enc.inputs["image_grid_thw"].repeat_interleave(k, dim=0)
    return out


def test_same_seed_same_answers_other_seed_other_draw(adapter) -> None:
    k = 6
    seeds = [[sample_seed(7, f"q{b}", i) for i in range(k)] for b in range(2)]
    _, first, _ = _draw(adapter, seeds)
    _, again, _ = _draw(adapter, seeds)
    assert first == again
    other = [[sample_seed(8, f"q{b}", i) for i in range(k)] for b in range(2)]
    _, different, _ = _draw(adapter, other)
    assert different != first


def test_draws_do_not_depend_on_batch_composition(adapter) -> None:
    seeds = [[sample_seed(3, f"q{b}", i) for i in range(4)] for b in range(2)]
    _, batch, _ = _draw(adapter, seeds)
    _, alone, _ = _draw(adapter, seeds[:1], questions=QUESTIONS[:1])
    assert alone[0] == batch[0]


def test_first_token_draws_match_temperature_top_p_distribution() -> None:
    """2,000 draws of SeededSampler vs the exact temperature / top-p distribution (chi-square)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    temperature, top_p = 0.7, 0.9
    expected = top_p_filter(logits, temperature, top_p)[0].numpy()
    n = 2000
    sampler = SeededSampler([sample_seed(0, "chi", i) for i in range(n)], temperature, top_p)
    chosen = sampler(torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1)).argmax(-1).numpy()
    counts = np.bincount(chosen, minlength=12)
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the nucleus was drawn"
    _, p_value = stats.chisquare(counts[support], expected[support] * n)
    assert p_value > 0.01


def test_top_p_filter_against_hand_example() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = top_p_filter(logits, temperature=1.0, top_p=0.75)
    # 0.5 < 0.75 so the second token is needed; 0.8 >= 0.75 so the nucleus is {0, 1}
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_samples_whose_first_draw_is_eos_end_there(adapter) -> None:
    """Some samples end at their first token, others go on; the ended ones decode to '' and padding."""
    enc = _encode(adapter)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=2, keep_cache=True)
    first = cap.greedy_output.logits[0].clone()
    eos = adapter.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    end = end_token_ids(adapter)
    word = next(int(t) for t in first[0].argsort(descending=True) if int(t) not in end)
    first[0] = float("-inf")
    first[0, [eos, word]] = 0.0  # row 0: EOS or `word`, even odds
    cap.greedy_output.logits = (first,) + tuple(cap.greedy_output.logits[1:])
    k = 8
    seeds = [[sample_seed(5, f"e{b}", i) for i in range(k)] for b in range(2)]
    texts, out = sample_answers(adapter, enc, cap.greedy_output, seeds, max_new_tokens=4, return_logits=True)
    prompt_len = enc.inputs["input_ids"].shape[1]
    new = out.sequences[:k, prompt_len:]
    ended = new[:, 0] == eos
    assert 0 < int(ended.sum()) < k, "the seeds should give both outcomes"
    assert all(texts[0][i] == "" for i in range(k) if ended[i])
    assert (new[ended, 1:] == adapter.tokenizer.pad_token_id).all()
    assert all(texts[0][i] != "" for i in range(k) if not ended[i])


def test_samples_need_the_greedy_logits(adapter) -> None:
    enc = _encode(adapter)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=2, keep_cache=True)
    cap.greedy_output.logits = None
    with pytest.raises(ValueError, match="output_logits=True"):
        sample_answers(adapter, enc, cap.greedy_output, [[1, 2], [3, 4]])


def test_a_layer_that_bypasses_the_shared_prefix_attention_is_an_error(adapter) -> None:
    """A decoder layer whose attention skipped VRP's function would have seen only its own suffix."""
    require_every_layer(adapter, range(adapter.num_layers), SHARED_PREFIX_BACKEND)
    with pytest.raises(RuntimeError, match=r"decoder layers \[0\]"):
        require_every_layer(adapter, range(1, adapter.num_layers), SHARED_PREFIX_BACKEND)


def test_a_position_bias_is_refused_not_silently_wrong(adapter) -> None:
    enc = _encode(adapter)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=2, keep_cache=True)
    layer = cap.greedy_output.cache.layers[0]
    cache = Cache(layers=[SharedPrefixLayer(layer.keys, layer.values)])
    module = adapter.attn(0)
    query = torch.zeros(
        2, adapter.model.config.get_text_config().num_attention_heads, 1, layer.keys.shape[-1]
    )
    with shared_prefix(adapter, cache), pytest.raises(NotImplementedError, match="position bias"):
        shared_prefix_attention(module, query, query[:, :2], query[:, :2], None, position_bias=query)
