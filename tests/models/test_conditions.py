"""Image conditions: the pixels, and condition runs against direct eager forwards of each tiny family."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from PIL import Image

import vrp.ingest.models as models
from vrp.ingest import conditions
from vrp.ingest.datasets import generate_shapes_pope, load_dataset, load_image
from vrp.ingest.models.registry import family_of_model_type
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestError, IngestOptions, run_ingest
from vrp.lake import open_lake

N_QUESTIONS = 6


# ----- pixels --------------------------------------------------------------------------------------
def _photo(width: int = 37, height: int = 23, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def test_blank_is_exactly_grey_at_the_original_size() -> None:
    original = _photo(37, 23)
    blank = conditions.blank_image(original)
    assert blank.size == (37, 23) and blank.mode == "RGB"
    assert (np.asarray(blank) == 128).all()


def test_noise_equals_a_numpy_implementation_for_a_fixed_seed() -> None:
    original = _photo(19, 11, seed=3)
    steps, seed = 500, 7
    got = np.asarray(conditions.noise_image(original, steps, np.random.default_rng(seed)))
    # the formula written out independently: linear betas 1e-4..0.02 over 1000 steps, abar_t = prod (1-b)
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])
    abar = 1.0
    for beta in betas[:steps]:
        abar *= 1.0 - beta
    x = np.asarray(original).astype(np.float64) / 255.0 * 2.0 - 1.0
    eps = np.random.default_rng(seed).standard_normal(x.shape)
    xt = np.sqrt(abar) * x + np.sqrt(1.0 - abar) * eps
    expected = np.clip(np.round((xt + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, np.asarray(original))
    # zero steps leave the image unchanged; the per-sample generator is stable across calls
    unchanged = conditions.noise_image(original, 0, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(original))
    a = conditions.sample_rng(1, "sample-a").standard_normal(4)
    np.testing.assert_array_equal(a, conditions.sample_rng(1, "sample-a").standard_normal(4))
    assert not np.array_equal(a, conditions.sample_rng(1, "sample-b").standard_normal(4))


def test_mismatch_never_returns_the_own_image_and_is_seed_stable() -> None:
    ids = [f"img{i % 7}" for i in range(40)]
    for seed in range(20):
        mapping = conditions.mismatch_map(ids, seed)
        assert set(mapping) == set(ids) and set(mapping.values()) == set(ids)
        assert all(src != dst for src, dst in mapping.items())
        assert mapping == conditions.mismatch_map(list(reversed(ids)), seed)
    assert len({tuple(sorted(conditions.mismatch_map(ids, s).items())) for s in range(20)}) > 1
    with pytest.raises(conditions.ConditionError, match="at least two different images"):
        conditions.mismatch_map(["only"] * 3, 0)


# ----- condition runs on the tiny families ------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("conditions")
    data = generate_shapes_pope(root / "shapes", images=4, seed=5)
    tiny = {
        f: build_tiny(f, root / f"tiny-{f}", seed=1, num_layers=3) for f in ("llava", "paligemma", "qwen2vl")
    }
    return root, data, tiny


def _options(model, data, **overrides) -> IngestOptions:
    base = {
        "model": str(model),
        "data_dir": str(data),
        "limit": N_QUESTIONS,
        "batch_size": 3,
        "self_consistency": 0,
        "commit_samples": 4,
    }
    return IngestOptions(**{**base, **overrides})


def _quiet(_line: str) -> None:
    return None


def _direct(model_dir, images, prompt: str):
    """One question through a freshly loaded model with eager attention: (logits, residual per layer)."""
    processor = models.loading.load_processor(str(model_dir), _family(model_dir))[0]
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    kwargs = {"text": [prompt], "return_tensors": "pt"}
    if images is not None:
        kwargs["images"] = images
    batch = {k: v for k, v in processor(**kwargs).items() if k != "labels"}
    layers = model.model.language_model.layers
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, i=i: seen.setdefault(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            logits = model(**batch).logits[0, -1].float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [seen[i][0, -1].float().numpy() for i in range(len(layers))], processor


def _family(model_dir) -> str:
    return family_of_model_type(json.loads((model_dir / "config.json").read_text())["model_type"]).name


def _prompt(family: str, processor, question: str, *, image: bool) -> str:
    """Each family's prompt, written out here rather than taken from the adapter under test."""
    if family == "llava":
        return f"USER: <image>\n{question}\nASSISTANT:" if image else f"USER: {question}\nASSISTANT:"
    if family == "paligemma":
        return question
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _stored(lake, run_id: str, sample_id: str):
    sample = lake.arrow("samples", filter={"run_id": run_id}).to_pylist()
    row = next(r for r in sample if r["sample_id"] == sample_id)
    hidden = lake.arrow("hidden", filter={"run_id": run_id, "site": "resid"}).to_pylist()
    resid = {r["layer"]: np.asarray(r["h"]) for r in hidden if r["sample_id"] == sample_id}
    return row, resid


def _p_yes(logits: torch.Tensor, model_dir) -> float:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = models.answer_token_ids(tokenizer, "yes")
    return float(torch.softmax(logits, -1)[ids].sum())


@pytest.mark.parametrize("family", ["llava", "paligemma", "qwen2vl"])
def test_blank_run_equals_a_direct_forward_on_a_grey_image(workspace, family) -> None:
    root, data, tiny = workspace
    lake_dir = str(root / f"lake-{family}")
    image_run = run_ingest(_options(tiny[family], data), lake_dir, echo=_quiet)
    blank = run_ingest(_options(tiny[family], data, image_condition="blank"), lake_dir, echo=_quiet)
    assert blank.written == N_QUESTIONS
    lake = open_lake(lake_dir)
    run = lake.arrow("runs", filter={"run_id": blank.run_id}).to_pylist()[0]
    assert run["kind"] == "blank" and run["base_run_id"] == image_run.run_id

    def ids(run_id: str) -> list[str]:
        return sorted(lake.arrow("samples", filter={"run_id": run_id}).column("sample_id").to_pylist())

    assert ids(blank.run_id) == ids(image_run.run_id)

    samples, _ = load_dataset("shapes-pope", data_dir=str(data))
    for sample in samples[:2]:
        original = load_image(sample)
        grey = Image.new("RGB", original.size, (128, 128, 128))
        processor = models.loading.load_processor(str(tiny[family]), family)[0]
        prompt = _prompt(family, processor, sample.question, image=True)
        logits, resid, _ = _direct(tiny[family], [grey], prompt)
        row, stored = _stored(lake, blank.run_id, sample.sample_id)
        assert row["p_yes"] == pytest.approx(_p_yes(logits, tiny[family]), abs=1e-5)
        for layer, expected in enumerate(resid):
            np.testing.assert_allclose(stored[layer], expected, atol=1e-4, rtol=0)
        # first-token KL(image || blank) against scipy on the two direct distributions
        image_logits, _, _ = _direct(tiny[family], [original], prompt)
        p = torch.softmax(image_logits.double(), -1).numpy()
        q = torch.softmax(logits.double(), -1).numpy()
        assert row["first_token_kl"] == pytest.approx(scipy.stats.entropy(p, q), rel=1e-3, abs=1e-6)
        assert row["first_token_kl"] > 0

    again = run_ingest(_options(tiny[family], data, image_condition="blank"), lake_dir, echo=_quiet)
    assert again.written == 0 and again.skipped_done == N_QUESTIONS
    assert len(ids(blank.run_id)) == N_QUESTIONS


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_none_run_equals_a_direct_text_only_forward(workspace, family) -> None:
    root, data, tiny = workspace
    lake_dir = str(root / f"lake-none-{family}")
    run_ingest(_options(tiny[family], data), lake_dir, echo=_quiet)
    none = run_ingest(_options(tiny[family], data, image_condition="none"), lake_dir, echo=_quiet)
    lake = open_lake(lake_dir)
    samples, _ = load_dataset("shapes-pope", data_dir=str(data))
    processor = models.loading.load_processor(str(tiny[family]), family)[0]
    for sample in samples[:2]:
        logits, resid, _ = _direct(
            tiny[family], None, _prompt(family, processor, sample.question, image=False)
        )
        row, stored = _stored(lake, none.run_id, sample.sample_id)
        assert row["n_image_tokens"] == 0 and row["spatial_entropy"] is None
        assert row["p_yes"] == pytest.approx(_p_yes(logits, tiny[family]), abs=1e-5)
        for layer, expected in enumerate(resid):
            np.testing.assert_allclose(stored[layer], expected, atol=1e-4, rtol=0)
    # no image tokens: no attention maps or heads, but every layer's logit lens
    for table, expected in (("attention_maps", 0), ("heads", 0), ("layers", N_QUESTIONS * 3)):
        assert lake.arrow(table, filter={"run_id": none.run_id}).num_rows == expected


def _no_loading(*_args, **_kwargs):
    raise AssertionError("a model was loaded although the run had to be refused first")


def test_none_on_a_family_needing_an_image_fails_before_loading(workspace, monkeypatch) -> None:
    root, data, tiny = workspace
    lake_dir = root / "lake-refused"
    run_ingest(_options(tiny["paligemma"], data), str(lake_dir), echo=_quiet)
    before = sorted(
        os.path.relpath(os.path.join(d, f), lake_dir) for d, _, fs in os.walk(lake_dir) for f in fs
    )
    monkeypatch.setattr(models, "load_adapter", _no_loading)
    with pytest.raises(IngestError, match="not available for paligemma.*--image-condition blank"):
        run_ingest(_options(tiny["paligemma"], data, image_condition="none"), str(lake_dir), echo=_quiet)
    after = sorted(
        os.path.relpath(os.path.join(d, f), lake_dir) for d, _, fs in os.walk(lake_dir) for f in fs
    )
    assert after == before


def test_condition_run_without_its_image_run_is_refused(workspace, monkeypatch) -> None:
    root, data, tiny = workspace
    lake_dir = root / "lake-empty"
    monkeypatch.setattr(models, "load_adapter", _no_loading)
    with pytest.raises(
        IngestError, match="run `vrp ingest run` with the same options and --image-condition image"
    ):
        run_ingest(_options(tiny["llava"], data, image_condition="noise"), str(lake_dir), echo=_quiet)
    assert not lake_dir.exists() or not any(lake_dir.rglob("*.parquet"))


def test_other_settings_than_the_image_run_are_refused(workspace) -> None:
    root, data, tiny = workspace
    lake_dir = str(root / "lake-mismatched")
    run_ingest(_options(tiny["llava"], data), lake_dir, echo=_quiet)
    with pytest.raises(IngestError, match="with other settings"):
        run_ingest(
            _options(tiny["llava"], data, image_condition="blank", max_new_tokens=3), lake_dir, echo=_quiet
        )
    assert open_lake(lake_dir).arrow("runs").num_rows == 1


def test_mismatch_run_sees_another_questions_image(workspace) -> None:
    root, data, tiny = workspace
    lake_dir = str(root / "lake-mismatch")
    base = run_ingest(_options(tiny["llava"], data), lake_dir, echo=_quiet)
    mism = run_ingest(
        _options(tiny["llava"], data, image_condition="mismatch", condition_seed=3), lake_dir, echo=_quiet
    )
    lake = open_lake(lake_dir)
    rows = {r["sample_id"]: r for r in lake.arrow("samples", filter={"run_id": mism.run_id}).to_pylist()}
    samples, _ = load_dataset("shapes-pope", data_dir=str(data))
    samples = samples[:N_QUESTIONS]
    mapping = conditions.mismatch_map([s.image_id for s in samples], 3)
    first = {}
    for s in sorted(samples, key=lambda s: s.sample_id):
        first.setdefault(s.image_id, s)
    # the stored residual equals a direct forward on the donor question's image: that is what it saw
    sample = samples[0]
    donor = load_image(first[mapping[sample.image_id]])
    _, resid, _ = _direct(tiny["llava"], [donor], _prompt("llava", None, sample.question, image=True))
    _, stored = _stored(lake, mism.run_id, sample.sample_id)
    np.testing.assert_allclose(stored[2], resid[2], atol=1e-4, rtol=0)
    assert set(rows) == {s.sample_id for s in samples}
    assert base.run_id != mism.run_id
