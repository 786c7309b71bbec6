"""The greedy answer and K self-consistency samples, decoded in one loop from one prefill.

Checked against independent computations: a fresh forward over each whole prefix (logits), plain
``model.generate(do_sample=False)`` (the greedy tokens), and a replay of the seeded draws over the
fresh forward's distributions (the samples).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from transformers.cache_utils import Cache

from vrp.ingest.capture import capture_batch, end_token_ids, prefill_one_token, require_every_layer
from vrp.ingest.generate import (
    SHARED_PREFIX_BACKEND,
    SeededSampler,
    SharedPrefixLayer,
    decode_answers,
    sample_seed,
    shared_prefix,
    shared_prefix_attention,
    top_p_filter,
)
from vrp.ingest.models.registry import families

FAMILIES = tuple(fam.name for fam in families())  # every registered family
# different lengths, so the batch is left-padded
QUESTIONS = ["Is there a red circle in the image?", "Is there a square?"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tiny_adapter):
    return tiny_adapter(request.param, seed=1, num_layers=2)


def _encode(adapter, questions=QUESTIONS):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in QUESTIONS]
    return adapter.encode(images[: len(questions)], list(questions))


def _seeds(base, k, rows=2, name="s"):
    return [[sample_seed(base, f"{name}{b}", i) for i in range(k)] for b in range(rows)]


def _decode(adapter, seeds, questions=QUESTIONS, max_new_tokens=4, temperature=1.5):
    enc = _encode(adapter, questions)
    decoded = decode_answers(
        adapter,
        enc,
        prefill_one_token(adapter, enc),
        seeds,
        max_new_tokens=max_new_tokens,
        return_logits=True,
        temperature=temperature,
    )
    return enc, decoded


def _generate(adapter, enc, max_new_tokens):
    """Plain transformers greedy decoding of the batch, the reference for the greedy answer."""
    with torch.no_grad():
        return adapter.model.generate(
            **enc.inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )


@contextlib.contextmanager
def _eos(adapter, ids):
    """The model ends an answer on ``ids`` for the block's duration."""
    config = adapter.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = list(ids)
    try:
        yield
    finally:
        config.eos_token_id = saved


def _fresh_logits(adapter, enc, rows, tokens):
    """Next-token logits [N, V] of a fresh forward over the prompts of ``rows`` + ``tokens`` [N, s]."""
    step = tokens.shape[1]
    inputs = {name: value[rows] for name, value in enc.inputs.items() if not name.startswith("pixel_values")}
    inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    inputs["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(len(rows), step, dtype=torch.long)], dim=1
    )
    # generated tokens take the family's type (test_models.py checks it against the processor)
    for name, value in adapter.spec.generated_token_types.items():
        if name in inputs:
            new = torch.full((len(rows), step), value, dtype=inputs[name].dtype)
            inputs[name] = torch.cat([inputs[name], new], 1)
    inputs.update(_repeat_pixels(enc, rows))
    with torch.no_grad():
        return adapter.model(**inputs).logits[:, -1].float()


def _unfinished(tokens, end):
    """Which rows have no end token among ``tokens`` [N, s] (their next logits are still their own)."""
    return torch.tensor([not (set(row.tolist()) & end) for row in tokens], dtype=torch.bool)


def test_samples_are_seeded_draws_from_fresh_forward_distributions(adapter) -> None:
    """At every step each unfinished sample's logits equal a fresh pass over its whole prefix, and
    replaying its generator over the fresh pass's distribution draws the token it decoded."""
    k, temperature, top_p = 3, 1.5, 0.9
    seeds = _seeds(0, k)
    enc, decoded = _decode(adapter, seeds, temperature=temperature)
    out = decoded.samples
    tokens = out.sequences[:, enc.inputs["input_ids"].shape[1] :]
    rows = torch.arange(2).repeat_interleave(k)
    end = end_token_ids(adapter)
    replay = SeededSampler([s for row in seeds for s in row], temperature, top_p)
    assert len(out.logits) == tokens.shape[1] > 1, "the samples should decode past their first token"
    for step, step_logits in enumerate(out.logits):
        unfinished = _unfinished(tokens[:, :step], end)
        fresh = _fresh_logits(adapter, enc, rows, tokens[:, :step])
        torch.testing.assert_close(step_logits.float()[unfinished], fresh[unfinished], atol=1e-5, rtol=1e-5)
        # every generator draws once per step, finished rows too, so the streams stay aligned
        assert torch.equal(replay.draw(fresh)[unfinished], tokens[unfinished, step])


@pytest.mark.parametrize("k", [0, 3])
def test_greedy_answer_is_generates_with_fresh_logits(adapter, k) -> None:
    """The greedy rows of the shared loop give plain generate's tokens, and a fresh forward's logits."""
    enc, decoded = _decode(adapter, _seeds(2, k), max_new_tokens=4)
    prompt_len = enc.inputs["input_ids"].shape[1]
    reference = _generate(adapter, enc, 4)
    assert torch.equal(decoded.tokens, reference.sequences[:, prompt_len:])
    assert len(decoded.logits) == decoded.tokens.shape[1] == 4, "random weights: no row should end early"
    rows = torch.arange(2)
    for step, step_logits in enumerate(decoded.logits):
        fresh = _fresh_logits(adapter, enc, rows, decoded.tokens[:, :step])
        torch.testing.assert_close(step_logits, fresh, atol=1e-4, rtol=1e-4)
    assert [len(texts) for texts in decoded.sampled] == [k, k]


def test_greedy_follows_the_generation_configs_processors(adapter) -> None:
    """Logits processors of the generation config (a suppressed token, a repetition penalty, as
    Qwen2-VL's checkpoints set) apply to the greedy rows in the loop as generate applies them."""
    enc = _encode(adapter)
    prompt_len = enc.inputs["input_ids"].shape[1]
    plain = _generate(adapter, enc, 5).sequences[:, prompt_len:]
    config = adapter.model.generation_config
    saved = config.suppress_tokens, config.repetition_penalty
    config.suppress_tokens, config.repetition_penalty = [int(plain[0, 1])], 1.5
    try:
        _, decoded = _decode(adapter, _seeds(2, 2), max_new_tokens=5)
        reference = _generate(adapter, enc, 5).sequences[:, prompt_len:]
    finally:
        config.suppress_tokens, config.repetition_penalty = saved
    assert torch.equal(decoded.tokens, reference)
    assert not torch.equal(plain, reference), "suppressing row 0's second token must change its answer"


def test_capture_batch_answer_logprob_and_samples(adapter) -> None:
    """capture_batch's answer is generate's, its log-probability a fresh forward's, its samples the draws."""
    seeds = _seeds(6, 3)
    enc = _encode(adapter)
    cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=3, seeds=seeds, temperature=1.5)
    prompt_len = enc.inputs["input_ids"].shape[1]
    tokens = _generate(adapter, enc, 3).sequences[:, prompt_len:]
    assert torch.equal(cap.greedy_tokens, tokens)
    texts = adapter.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    end = end_token_ids(adapter)
    for b in range(2):
        assert cap.samples[b]["answer_text"] == texts[b]
        length = next((i for i, t in enumerate(tokens[b].tolist()) if t in end), 3)
        logprobs = [
            float(
                torch.log_softmax(_fresh_logits(adapter, enc, [b], tokens[b : b + 1, :i])[0], -1)[
                    tokens[b, i]
                ]
            )
            for i in range(max(length, 1))
        ]
        assert cap.samples[b]["answer_logprob"] == pytest.approx(np.mean(logprobs), abs=1e-4)
    _, decoded = _decode(adapter, seeds, max_new_tokens=3)
    assert cap.sampled == decoded.sampled
    assert capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=3).sampled == [[], []]


def test_greedy_that_ends_early_while_samples_continue(adapter) -> None:
    """Row 0's greedy answer ends at its first token, row 1's at its second; the samples decode on."""
    enc = _encode(adapter)
    prompt_len = enc.inputs["input_ids"].shape[1]
    free = _generate(adapter, enc, 4).sequences[:, prompt_len:]
    eos = adapter.model.generation_config.eos_token_id
    ends = {*(eos if isinstance(eos, list) else [eos]), int(free[0, 0]), int(free[1, 1])}
    with _eos(adapter, ends):
        enc, decoded = _decode(adapter, _seeds(9, 4), max_new_tokens=4)
        reference = _generate(adapter, enc, 4)
        cap = capture_batch(adapter, enc, ["yes", "no"], max_new_tokens=4)
        end = end_token_ids(adapter)
    alone = reference.sequences[:, prompt_len:]
    assert alone.shape[1] < 4, "generate alone should stop once both greedy answers ended"
    assert torch.equal(decoded.tokens, alone)
    assert (alone[0, 1:] == adapter.tokenizer.pad_token_id).all()
    samples = decoded.samples.sequences[:, prompt_len:]
    assert samples.shape[1] > alone.shape[1], "some sample should decode past the greedy answers' end"
    for step, step_logits in enumerate(decoded.logits):
        torch.testing.assert_close(step_logits, reference.logits[step], atol=1e-4, rtol=1e-4)
    texts = adapter.tokenizer.batch_decode(alone, skip_special_tokens=True)
    assert [s["answer_text"] for s in cap.samples] == texts
    for b in range(2):
        length = next((i for i, t in enumerate(alone[b].tolist()) if t in end), alone.shape[1])
        chosen = [
            float(torch.log_softmax(reference.logits[i][b], -1)[alone[b, i]]) for i in range(max(length, 1))
        ]
        assert cap.samples[b]["answer_logprob"] == pytest.approx(np.mean(chosen), abs=1e-4)


def test_no_decode_loop_when_every_first_token_ends(adapter) -> None:
    """Every token an end token: the greedy answer and every sample end at once, no forward runs."""
    enc = _encode(adapter)
    prefill = prefill_one_token(adapter, enc)
    calls = []
    handle = adapter.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with _eos(adapter, range(adapter.model.config.get_text_config().vocab_size)):
            decoded = decode_answers(adapter, enc, prefill, _seeds(1, 3), max_new_tokens=4)
    finally:
        handle.remove()
    assert calls == []
    assert decoded.tokens.shape == (2, 1) and len(decoded.logits) == 1
    assert all(len(texts) == 3 for texts in decoded.sampled)


def _repeat_pixels(enc, rows):
    """Pixels of the batch's ``rows``, repeats allowed (Qwen2-VL's patches and InternVL's tiles of all
    images are one tensor)."""
    rows = [int(r) for r in rows]
    out = {}
    for name, value in enc.inputs.items():
        if not name.startswith("pixel_values"):
            continue
        if "image_grid_thw" in enc.inputs:
            chunks = torch.split(value, enc.inputs["image_grid_thw"].prod(-1).tolist())
            out[name] = torch.cat([chunks[r] for r in rows])
        elif value.shape[0] != len(enc.layouts):  # InternVL: every image's tiles, one tensor per grid
            chunks = torch.split(value, [len(layout.grids) for layout in enc.layouts])
            out[name] = torch.cat([chunks[r] for r in rows])
        else:
            out[name] = value[rows]
    if "image_grid_thw" in enc.inputs:
        out["image_grid_thw"] = enc.inputs["image_grid_thw"][rows]
    return out


def test_same_seed_same_answers_other_seed_other_draw(adapter) -> None:
    seeds = _seeds(7, 6, name="q")
    first = _decode(adapter, seeds)[1].sampled
    assert _decode(adapter, seeds)[1].sampled == first
    assert _decode(adapter, _seeds(8, 6, name="q"))[1].sampled != first


def test_draws_do_not_depend_on_batch_composition(adapter) -> None:
    seeds = _seeds(3, 4, name="q")
    batch = _decode(adapter, seeds)[1].sampled
    alone = _decode(adapter, seeds[:1], questions=QUESTIONS[:1])[1].sampled
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
    prefill = prefill_one_token(adapter, enc)
    first = prefill.logits[0].clone()
    eos = adapter.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    end = end_token_ids(adapter)
    word = next(int(t) for t in first[0].argsort(descending=True) if int(t) not in end)
    first[0] = float("-inf")
    first[0, [eos, word]] = 0.0  # row 0: EOS or `word`, even odds
    prefill.logits = (first,)
    k = 8
    decoded = decode_answers(
        adapter, enc, prefill, _seeds(5, k, name="e"), max_new_tokens=4, return_logits=True
    )
    texts, out = decoded.sampled, decoded.samples
    prompt_len = enc.inputs["input_ids"].shape[1]
    new = out.sequences[:k, prompt_len:]
    ended = new[:, 0] == eos
    assert 0 < int(ended.sum()) < k, "the seeds should give both outcomes"
    assert all(texts[0][i] == "" for i in range(k) if ended[i])
    assert (new[ended, 1:] == adapter.tokenizer.pad_token_id).all()
    assert all(texts[0][i] != "" for i in range(k) if not ended[i])


def test_decoding_needs_the_prefills_logits(adapter) -> None:
    enc = _encode(adapter)
    prefill = prefill_one_token(adapter, enc)
    prefill.logits = None
    with pytest.raises(ValueError, match="output_logits=True"):
        decode_answers(adapter, enc, prefill, [[1, 2], [3, 4]])


def test_a_layer_that_bypasses_the_shared_prefix_attention_is_an_error(adapter) -> None:
    """A decoder layer whose attention skipped VRP's function would have seen only its own suffix."""
    require_every_layer(adapter, range(adapter.num_layers), SHARED_PREFIX_BACKEND)
    with pytest.raises(RuntimeError, match=r"decoder layers \[0\]"):
        require_every_layer(adapter, range(1, adapter.num_layers), SHARED_PREFIX_BACKEND)


def test_a_position_bias_is_refused_not_silently_wrong(adapter) -> None:
    enc = _encode(adapter)
    layer = prefill_one_token(adapter, enc).cache.layers[0]
    cache = Cache(layers=[SharedPrefixLayer(layer.keys, layer.values)])
    module = adapter.attn(0)
    query = torch.zeros(
        2, adapter.model.config.get_text_config().num_attention_heads, 1, layer.keys.shape[-1]
    )
    with shared_prefix(adapter, cache), pytest.raises(NotImplementedError, match="position bias"):
        shared_prefix_attention(module, query, query[:, :2], query[:, :2], None, position_bias=query)
