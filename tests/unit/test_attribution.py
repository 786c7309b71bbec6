"""`vrp analyze attribution` and visual dependence on a synthetic lake, against numpy and scipy."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import scipy.special
import scipy.stats
from click.testing import CliRunner

from vrp.analysis import attribution as attr
from vrp.analysis import compute
from vrp.analysis.data import query
from vrp.cli import main
from vrp.ingest.conditions import first_token_kl
from vrp.lake import open_lake

N, LAYERS, VOCAB = 90, 5, 11
SPLITS = ("random", "popular", "adversarial")


def _write(root) -> dict:
    """An image run and a blank run of one model; returns every planted array."""
    rng = np.random.default_rng(7)
    lake = open_lake(root)
    ids = [f"q{i:03d}" for i in range(N)]
    label = rng.choice(["yes", "no"], N)
    answer = np.where(rng.random(N) < 0.75, label, np.where(label == "yes", "no", "yes")).astype(object)
    answer[3] = None  # one unparsable image answer: left out
    cond_answer = np.where(rng.random(N) < 0.5, answer, "yes").astype(object)
    cond_answer[5] = None  # an unparsable condition answer: out of the flip rate only
    split = np.array([SPLITS[i % 3] for i in range(N)])
    m_img = rng.normal(0, 1, (N, LAYERS)) + np.linspace(0, 3, LAYERS)
    m_cond = rng.normal(0, 1, (N, LAYERS))
    attn = rng.normal(0, 1, (N, LAYERS))
    mlp = rng.normal(0, 2, (N, LAYERS))
    logp_img = scipy.special.log_softmax(rng.normal(0, 2, (N, VOCAB)), axis=1)
    logp_cond = scipy.special.log_softmax(rng.normal(0, 2, (N, VOCAB)), axis=1)
    kl = np.array([first_token_kl(logp_img[i], logp_cond[i]) for i in range(N)])
    runs = {}
    for kind, margins, answers in ((None, m_img, answer), ("blank", m_cond, cond_answer)):
        run = {
            "run_id": "img" if kind is None else "blank",
            "model": "toy",
            "dataset": "shapes-pope",
            "split": "all",
            "config": {"hidden_size": 4},
        }
        if kind:
            run |= {"kind": kind, "base_run_id": "img"}
        samples, layers = [], []
        for i, sid in enumerate(ids):
            a = answers[i]
            samples.append(
                {
                    "sample_id": sid,
                    "dataset": "shapes-pope",
                    "split": str(split[i]),
                    "image_id": f"im{i // 3}",
                    "label": str(label[i]),
                    "answer": a,
                    "parse_status": "ok" if a else "unknown",
                    "correct": None if a is None else a == label[i],
                    "top1_prob": float(rng.random()),
                    "first_token_kl": float(kl[i]) if kind else None,
                }
            )
            for layer in range(LAYERS):
                layers.append(
                    {
                        "sample_id": sid,
                        "layer": layer,
                        "lens_truth_margin": float(margins[i, layer]),
                        "attn_contrib": float(attn[i, layer]) if kind is None else 0.0,
                        "mlp_contrib": float(mlp[i, layer]) if kind is None else 0.0,
                    }
                )
        writer = lake.writer(run)
        writer.begin()
        writer.commit({"samples": samples, "layers": layers})
        writer.finish()
        runs[run["run_id"]] = run
    return {
        "ids": ids,
        "answer": answer,
        "cond_answer": cond_answer,
        "label": label,
        "split": split,
        "m_img": m_img,
        "m_cond": m_cond,
        "attn": attn,
        "mlp": mlp,
        "kl": kl,
        "logp_img": logp_img,
        "logp_cond": logp_cond,
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribution") / "lake"
    return str(root), _write(root)


def test_first_token_kl_equals_scipy() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        p_logits, q_logits = rng.normal(0, 3, 50), rng.normal(0, 3, 50)
        p, q = scipy.special.softmax(p_logits), scipy.special.softmax(q_logits)
        got = first_token_kl(scipy.special.log_softmax(p_logits), scipy.special.log_softmax(q_logits))
        assert got == pytest.approx(scipy.stats.entropy(p, q), rel=1e-10)


def test_attribution_matches_numpy(planted) -> None:
    root, t = planted
    (a,) = attr.attributions(open_lake(root), n_boot=200, seed=3)
    keep = np.array([x is not None for x in t["answer"]])
    correct = np.array([x == lab for x, lab in zip(t["answer"], t["label"], strict=True)])
    delta = t["m_img"] - t["m_cond"]
    for group, mask in (("all", keep), ("correct", keep & correct), ("wrong", keep & ~correct)):
        np.testing.assert_allclose(a.delta[group].mean, delta[mask].mean(0), atol=1e-12)
        assert a.delta[group].n == mask.sum()
        assert (a.delta[group].low <= a.delta[group].mean).all()
        assert (a.delta[group].mean <= a.delta[group].high).all()
    mean = delta[keep].mean(0)
    peak = int(np.argmax(mean))
    assert a.peak == peak
    m, at = np.abs(t["mlp"][keep]).mean(0), np.abs(t["attn"][keep]).mean(0)
    assert a.shares["peak"] == pytest.approx(m[peak] / (m[peak] + at[peak]), rel=1e-12)
    boost = mean > 0
    assert a.shares["boosting"] == pytest.approx(
        m[boost].sum() / (m[boost].sum() + at[boost].sum()), rel=1e-12
    )
    assert a.shares["all"] == pytest.approx(m.sum() / (m.sum() + at.sum()), rel=1e-12)
    both = keep & np.array([x is not None for x in t["cond_answer"]])
    flips = [t["answer"][i] != t["cond_answer"][i] for i in np.flatnonzero(both)]
    assert a.flip_rate == pytest.approx(np.mean(flips))
    assert a.mean_kl == pytest.approx(
        np.mean(
            [
                scipy.stats.entropy(np.exp(t["logp_img"][i]), np.exp(t["logp_cond"][i]))
                for i in np.flatnonzero(keep)
            ]
        )
    )
    for split in SPLITS:
        rows = np.flatnonzero(both & (t["split"] == split))
        share, n = a.unchanged[split]
        assert n == rows.size
        assert share == pytest.approx(np.mean([t["answer"][i] == t["cond_answer"][i] for i in rows]))


def test_bootstrap_ci_of_the_mean_against_a_direct_resample() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 3))
    got = attr.mean_ci(values, n_boot=500, seed=11)
    draws = np.random.default_rng(11).integers(0, 40, size=(500, 40))  # how bootstrap_counts draws
    boot = values[draws].mean(axis=1)
    np.testing.assert_allclose(got.low, np.percentile(boot, 2.5, axis=0), atol=1e-10)
    np.testing.assert_allclose(got.high, np.percentile(boot, 97.5, axis=0), atol=1e-10)


def test_visual_dependence_query_and_headline(planted) -> None:
    root, t = planted
    lake = open_lake(root)
    rows = {r["sample_id"]: r for r in query(lake, "visual_dependence").to_pylist()}
    assert len(rows) == N
    for i, sid in enumerate(t["ids"]):
        r = rows[sid]
        assert r["condition"] == "blank" and r["run_id"] == "img" and r["condition_run_id"] == "blank"
        assert r["delta_truth_margin"] == pytest.approx(t["m_img"][i, -1] - t["m_cond"][i, -1])
        assert r["first_token_kl"] == pytest.approx(t["kl"][i])
    h = compute.headline(lake, n_boot=100, with_probe=False, with_fusion=False)
    label = compute.dependence_label("margin", "blank")
    cell = next(c for c in h.rows if c.metric == label)
    keep = np.array([x is not None for x in t["answer"]])
    y = np.array([x == lab for x, lab in zip(t["answer"], t["label"], strict=True)])[keep]
    x = (t["m_img"][:, -1] - t["m_cond"][:, -1])[keep]
    assert cell.r == pytest.approx(scipy.stats.pointbiserialr(y, x).statistic, rel=1e-9)
    kl_cell = next(c for c in h.rows if c.metric == compute.dependence_label("kl", "blank"))
    assert kl_cell.n == keep.sum()


def test_attribution_cli_formats(planted) -> None:
    root, _ = planted
    runner = CliRunner()
    base = ["analyze", "attribution", "--lake", root, "--n-boot", "50"]
    table = runner.invoke(main, base)
    assert table.exit_code == 0, table.output
    assert "peak visual layer" in table.output
    as_json = json.loads(runner.invoke(main, [*base, "--format", "json"]).output)
    assert as_json[0]["condition"] == "blank" and len(as_json[0]["layers"]) == LAYERS
    as_csv = list(csv.DictReader(io.StringIO(runner.invoke(main, [*base, "--format", "csv"]).output)))
    assert len(as_csv) == LAYERS and as_csv[0]["peak_layer"] == str(as_json[0]["peak_layer"])
    none = runner.invoke(main, [*base, "--condition", "none"])
    assert none.exit_code != 0 and "--image-condition blank" in none.output
