"""The capture engine against transformers' own eager attention and hidden states, per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vrp.ingest.capture import TraceModules, capture_attention, capture_batch, logit_lens
from vrp.ingest.models.registry import families
from vrp.tasks.yesno import yes_no_ids

FAMILIES = tuple(fam.name for fam in families())  # every registered family
QUESTIONS = ["Is there a red circle in the image?", "Is there a square?"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tiny_adapter):
    return tiny_adapter(request.param, seed=0, num_layers=3)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(2)]


def test_left_padding_is_exercised(adapter) -> None:
    enc = adapter.encode(_images(), QUESTIONS)
    assert (enc.inputs["attention_mask"] == 0).any(), "the test batch must contain left padding"


def test_attention_rows_equal_eager(adapter) -> None:
    """Answer-row attention from the SDPA wrapper == eager's output_attentions, every layer and head."""
    model = adapter.model
    enc = adapter.encode(_images(), QUESTIONS)
    prompt_len = enc.inputs["input_ids"].shape[1]
    with torch.no_grad(), capture_attention(adapter, enc.answer_pos, prompt_len) as rows:
        model(**enc.inputs)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**enc.inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    assert len(eager.attentions) == adapter.num_layers
    batch = torch.arange(len(QUESTIONS))
    for layer in range(adapter.num_layers):
        expected = eager.attentions[layer][batch, :, enc.answer_pos].float()  # [B, H, S]
        torch.testing.assert_close(rows.rows[layer], expected, atol=1e-5, rtol=0)
        # image columns carry real mass (the test would be vacuous if all rows were on text); a
        # sliding-window layer whose window ends after the image sees none of it
        if _layer_type(model, layer) == "sliding_attention":
            continue
        for b in range(len(QUESTIONS)):
            assert rows.rows[layer][b][:, enc.image_pos[b]].sum() > 0


# Families whose image block is attended bidirectionally, and the token types that make the same
# prompt fully causal: PaliGemma's 1 is its causal suffix, Gemma 3's 0 is text (no image block).
CAUSAL_TYPES = {"paligemma": 1, "gemma3": 0}


@pytest.mark.parametrize("family", sorted(CAUSAL_TYPES))
def test_answer_rows_use_the_models_bidirectional_image_mask(tiny_adapter, family) -> None:
    """VRP's rows equal eager attention under the model's mask and differ from a causal image block.

    With the image block attended causally (a mask dropped on the way, as a static cache does in
    transformers) the keys of image tokens change from layer 1 on, and this test fails.
    """
    adapter = tiny_adapter(family, seed=0, num_layers=3)
    model = adapter.model
    enc = adapter.encode(_images(), QUESTIONS)
    prompt_len = enc.inputs["input_ids"].shape[1]
    with torch.no_grad(), capture_attention(adapter, enc.answer_pos, prompt_len) as rows:
        model(**enc.inputs)
    causal_inputs = dict(enc.inputs)
    causal_inputs["token_type_ids"] = torch.full_like(enc.inputs["token_type_ids"], CAUSAL_TYPES[family])
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            own = model(**enc.inputs, output_attentions=True).attentions
            causal = model(**causal_inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    batch = torch.arange(len(QUESTIONS))
    for layer in range(adapter.num_layers):
        torch.testing.assert_close(
            rows.rows[layer], own[layer][batch, :, enc.answer_pos].float(), atol=1e-5, rtol=0
        )
    gap = max(
        float((rows.rows[layer] - causal[layer][batch, :, enc.answer_pos].float()).abs().max())
        for layer in range(1, adapter.num_layers)
    )
    assert gap > 10 * 1e-5  # far outside the tolerance above: a causal computation could not pass it


def _layer_type(model, layer: int) -> str:
    types = getattr(model.config.get_text_config(), "layer_types", None)
    return types[layer] if types else "full_attention"


def test_resid_equals_hidden_states_and_last_is_before_norm(adapter) -> None:
    model = adapter.model
    enc = adapter.encode(_images(), QUESTIONS)
    prompt_len = enc.inputs["input_ids"].shape[1]
    with (
        torch.no_grad(),
        TraceModules({"resid": adapter.decoder_layers()}, enc.answer_pos, prompt_len) as trace,
    ):
        out = model(**enc.inputs, output_hidden_states=True)
    batch = torch.arange(len(QUESTIONS))
    states = out.hidden_states  # embeddings first; the last entry is after the final norm
    assert len(states) == adapter.num_layers + 1
    for layer in range(adapter.num_layers - 1):
        torch.testing.assert_close(
            trace.values["resid"][layer], states[layer + 1][batch, enc.answer_pos].float()
        )
    last = trace.values["resid"][adapter.num_layers - 1]
    normed = adapter.final_norm()(last)
    torch.testing.assert_close(normed, states[-1][batch, enc.answer_pos].float(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(last, normed, atol=1e-3), "the stored last layer must be before the final norm"


def test_capture_batch_signals(adapter) -> None:
    enc = adapter.encode(_images(), QUESTIONS)
    labels = ["yes", "no"]
    cap = capture_batch(adapter, enc, labels, max_new_tokens=3)
    with torch.no_grad():
        logits = adapter.model(**enc.inputs).logits[torch.arange(2), enc.answer_pos].float()
    for b in range(2):
        sample = cap.samples[b]
        yes = torch.logsumexp(logits[b, yes_no_ids(adapter)[0]], 0)
        no = torch.logsumexp(logits[b, yes_no_ids(adapter)[1]], 0)
        # the logit lens at the last layer is the model's own next-token distribution
        assert cap.layers[b][-1]["lens_yes_no_margin"] == pytest.approx(float(yes - no), abs=1e-4)
        assert sample["yes_no_margin"] == pytest.approx(float(yes - no), abs=1e-4)
        probs = torch.softmax(logits[b], -1)
        assert sample["p_yes"] == pytest.approx(float(probs[yes_no_ids(adapter)[0]].sum()), abs=1e-6)
        assert sample["top1_prob"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert cap.layers[b][-1]["lens_answer_rank"] == 0
        layout = enc.layouts[b]  # one grid, or several (a global view and tiles, plus row separators)
        assert sample["n_image_tokens"] == len(enc.image_pos[b]) == layout.n_tokens
        assert (sample["grid_h"], sample["grid_w"]) == layout.stitched and sample["n_grids"] == len(
            layout.grids
        )
        if not layout.multi:
            assert sample["n_image_tokens"] == sample["grid_h"] * sample["grid_w"]
        for layer_grids in cap.grid_maps[b]:  # multi-grid only: each grid's map sums to 1 on its own
            assert [g.map.sum() for g in layer_grids] == pytest.approx([1.0] * len(layout.grids), abs=1e-5)
        for layer in range(adapter.num_layers):
            assert cap.maps[b][layer].sum() == pytest.approx(1.0, abs=1e-5)
        assert cap.nonfinite[b] is None


def test_direct_contributions_add_up_to_the_residual_update(adapter) -> None:
    """attn + MLP contribution of layer l == the change of the residual, read through the truth column."""
    enc = adapter.encode(_images(), QUESTIONS)
    labels = ["yes", "no"]
    cap = capture_batch(adapter, enc, labels, max_new_tokens=1)
    norm = adapter.final_norm()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    weight = norm.weight.detach().float() + adapter.spec.norm_offset
    lm = adapter.unembedding().weight.detach().float()
    with torch.no_grad():
        logits = adapter.model(**enc.inputs).logits[torch.arange(2), enc.answer_pos].float()
    for b, label in enumerate(labels):
        resid = torch.from_numpy(cap.hidden[b]["resid"]).float()
        ids = yes_no_ids(adapter)[0] if label == "yes" else yes_no_ids(adapter)[1]
        truth = ids[int(logits[b, ids].argmax())]
        scale = weight / torch.sqrt(resid[-1].pow(2).mean() + eps)
        for layer in range(1, adapter.num_layers):
            update = float(((resid[layer] - resid[layer - 1]) * scale) @ lm[truth])
            row = cap.layers[b][layer]
            assert row["attn_contrib"] + row["mlp_contrib"] == pytest.approx(update, rel=1e-4, abs=1e-4)


def test_logit_lens_last_layer_equals_model_logits(adapter) -> None:
    enc = adapter.encode(_images(), QUESTIONS)
    prompt_len = enc.inputs["input_ids"].shape[1]
    with (
        torch.no_grad(),
        TraceModules({"resid": adapter.decoder_layers()}, enc.answer_pos, prompt_len) as trace,
    ):
        logits = adapter.model(**enc.inputs).logits[torch.arange(2), enc.answer_pos].float()
    resid = torch.stack([trace.values["resid"][i] for i in range(adapter.num_layers)])
    torch.testing.assert_close(logit_lens(adapter, resid)[-1], logits, atol=1e-5, rtol=1e-5)


def test_forward_hooks_remove_every_handle_also_when_installing_one_fails():
    from vrp.ingest.capture import ForwardHooks

    seen: list[int] = []
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    class Broken(ForwardHooks):
        def _targets(self):
            yield first, lambda _m, _i, _o: seen.append(1)
            raise RuntimeError("no such module")

    with pytest.raises(RuntimeError, match="no such module"), Broken():
        pass
    first(torch.zeros(1, 2))
    assert seen == [] and not first._forward_hooks  # the hook installed before the failure is gone

    class Two(ForwardHooks):
        def _targets(self):
            yield first, lambda _m, _i, _o: seen.append(1)
            yield second, lambda _m, _i, _o: seen.append(2)

    with Two():
        first(torch.zeros(1, 2))
        second(torch.zeros(1, 2))
    first(torch.zeros(1, 2))
    second(torch.zeros(1, 2))
    assert seen == [1, 2] and not first._forward_hooks and not second._forward_hooks
