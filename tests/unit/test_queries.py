"""Each named query on a small lake against numbers computed here with numpy from what was written."""

from __future__ import annotations

import numpy as np
import pytest

from vrp.analysis.synthetic import write_synthetic_lake
from vrp.lake import open_lake
from vrp.lake.query import QUERIES_DIR, list_queries, named_query, run_query


@pytest.fixture(scope="module")
def lake_and_truth(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    truth = write_synthetic_lake(root, n=60, layers=3, hidden_size=8)
    return open_lake(root), truth


def _q(lake, name: str) -> list[dict]:
    return run_query(lake, named_query(name)).to_pylist()


def _scored(t):
    keep = np.array([c is not None for c in t.correct])
    return keep, np.array([bool(c) for c in t.correct[keep]])


def test_every_query_file_has_a_one_line_description() -> None:
    names = dict(list_queries())
    assert len(names) == len(list(QUERIES_DIR.glob("*.sql"))) >= 8
    for name, title in names.items():
        first = (QUERIES_DIR / f"{name}.sql").read_text().splitlines()[0]
        assert first.startswith("-- ") and title and len(title) > 20, name


def test_pope_metrics(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    rows = {(r["model"], r["split"]): r for r in _q(lake, "pope_metrics")}
    for model, t in truth.items():
        per_split = []
        for split in ("adversarial", "random"):
            m = t.split == split
            ans, lab = t.answer[m], t.label[m]
            tp = np.sum((ans == "yes") & (lab == "yes"))
            fp = np.sum((ans == "yes") & (lab == "no"))
            fn = np.sum((ans != "yes") & (lab == "yes"))
            expect = {
                "n": m.sum(),
                "unknown": sum(a is None for a in ans),
                "accuracy": np.mean(ans == lab),
                "precision": tp / (tp + fp),
                "recall": tp / (tp + fn),
                "f1": 2 * tp / (2 * tp + fp + fn),
                "yes_ratio": np.mean(ans == "yes"),
            }
            got = rows[(model, split)]
            for key, value in expect.items():
                assert got[key] == pytest.approx(value), (model, split, key)
            per_split.append(expect)
        mean = rows[(model, "mean over splits")]
        assert mean["n"] == 60 and mean["run_id"] is None
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert mean[key] == pytest.approx(np.mean([e[key] for e in per_split]))


def test_unknown_answers(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    for r in _q(lake, "unknown_answers"):
        t = truth[r["model"]]
        m = t.split == r["split"]
        unknown = sum(a is None for a in t.answer[m])
        assert (r["n"], r["unknown"]) == (m.sum(), unknown)
        assert r["most_common_unknown_text"] == ("maybe" if unknown else None)


def test_metric_means_by_correctness(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    rows = _q(lake, "metric_means_by_correctness")
    assert len(rows) == sum(len({c for c in t.correct}) for t in truth.values())
    for r in rows:
        t = truth[r["model"]]
        m = np.array(
            [
                c is r["correct"] if r["correct"] is None else c == r["correct"] and c is not None
                for c in t.correct
            ]
        )
        assert r["n"] == m.sum()
        assert r["token_entropy"] == pytest.approx(t.metrics["token_entropy"][m].mean())
        assert r["abs_yes_no_margin"] == pytest.approx(np.abs(t.metrics["yes_no_margin"][m]).mean())
        assert r["cluster_count"] == pytest.approx(t.metrics["cluster_count"][m].mean())
        assert r["sc_agreement"] == pytest.approx(t.metrics["sc_agreement"][m].mean())


def test_lens_margin_by_layer(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    rows = _q(lake, "lens_margin_by_layer")
    assert len(rows) == 2 * 3 * 2  # models x layers x (correct, incorrect)
    for r in rows:
        t = truth[r["model"]]
        keep, y = _scored(t)
        m = y == r["correct"]
        margin = t.truth_margin[keep][m, r["layer"]]
        assert r["n"] == m.sum()
        assert r["truth_margin"] == pytest.approx(margin.mean())
        assert r["truth_margin_sd"] == pytest.approx(margin.std(ddof=1))
        assert r["share_answer_on_top"] == pytest.approx(np.mean(t.answer_rank[keep][m, r["layer"]] == 0))
        assert r["mlp_share"] == pytest.approx(0.3 / 0.4)


def test_spatial_entropy_by_layer(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    rows = _q(lake, "spatial_entropy_by_layer")
    for model, t in truth.items():
        got = [r for r in rows if r["model"] == model]
        mean = t.layer_entropy.mean(axis=0)
        assert [r["layer"] for r in got] == [0, 1, 2]
        assert [r["spatial_entropy"] for r in got] == pytest.approx(list(mean))
        assert got[0]["delta"] is None
        assert [r["delta"] for r in got[1:]] == pytest.approx(list(np.diff(mean)))
        # H_s / ln(N) on the 4x4 grid the synthetic lake stores
        assert [r["spatial_entropy_norm"] for r in got] == pytest.approx(list(mean / np.log(16)))


def test_correlation_inputs(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    rows = _q(lake, "correlation_inputs")
    for model, t in truth.items():
        keep, y = _scored(t)
        got = {r["sample_id"]: r for r in rows if r["model"] == model}
        ids = np.array(t.sample_ids)[keep]
        assert set(got) == set(ids)
        for i, sid in enumerate(ids):
            assert got[sid]["y"] == int(y[i])
            assert got[sid]["abs_yes_no_margin"] == pytest.approx(abs(t.metrics["yes_no_margin"][keep][i]))
            assert got[sid]["answer_logprob"] == pytest.approx(t.metrics["answer_logprob"][keep][i])


def test_intervention_accuracy(lake_and_truth) -> None:
    lake, truth = lake_and_truth
    rows = _q(lake, "intervention_accuracy")
    assert {(r["model"], r["condition"]) for r in rows} == {(m, c) for m in truth for c in ("high", "low")}
    for r in rows:
        t = truth[r["model"]]
        base = np.array([c is True for c in t.correct])
        after = t.interventions[r["condition"]]
        assert r["n"] == 60 and r["kind"] == "mask" and r["level"] == 0.3
        assert r["base_accuracy"] == pytest.approx(base.mean())
        assert r["accuracy"] == pytest.approx(after.mean())
        assert r["delta_pp"] == pytest.approx(100 * (after.mean() - base.mean()))
        assert r["right_to_wrong"] == np.sum(base & ~after)
        assert r["wrong_to_right"] == np.sum(~base & after)


def test_probe_best_layers(tmp_path) -> None:
    truth = write_synthetic_lake(tmp_path, models=("m",), n=12, layers=2, hidden_size=4, interventions=False)
    lake = open_lake(tmp_path)
    run_id = truth["m"].run_id
    aurocs = {(0, "logreg"): 0.6, (1, "logreg"): 0.9, (0, "mlp"): 0.7}
    lake.write_table(
        "probe_layers",
        [
            {
                "run_id": run_id,
                "model": "m",
                "site": "resid",
                "layer": layer,
                "probe": probe,
                "auroc": a,
                "auroc_low": a - 0.1,
                "auroc_high": a + 0.05,
                "n": 12,
                "folds": 2,
            }
            for (layer, probe), a in aurocs.items()
        ],
    )
    rows = {r["probe"]: r for r in _q(open_lake(tmp_path), "probe_best_layers")}
    assert (rows["logreg"]["layer"], rows["logreg"]["auroc"]) == (1, 0.9)
    assert (rows["mlp"]["layer"], rows["mlp"]["auroc"]) == (0, 0.7)


def test_most_confident_wrong_ranks_an_open_runs_yes_by_its_first_token() -> None:
    """An open-answer run's "yes" has no p_yes: its first token's probability ranks it (not NULLS LAST)."""
    import duckdb

    from vrp.view.build import _p_answer

    con = duckdb.connect()
    con.execute(
        "CREATE TABLE samples AS SELECT * FROM (VALUES "
        "('r', 'a', 'm', 'val', 'is there a dog?', 'yes', 'no', false, NULL, NULL, 0.9), "
        "('r', 'b', 'm', 'val', 'what colour?', 'red', 'blue', false, NULL, NULL, 0.6), "
        "('y', 'c', 'm', 'random', 'is there a cat?', 'yes', 'no', false, 0.7, 0.3, 0.99), "
        "('y', 'd', 'm', 'random', 'is there a cup?', 'no', 'yes', false, 0.2, 0.8, 0.5)) "
        "t(run_id, sample_id, model, split, question, answer, label, correct, p_yes, p_no, top1_prob)"
    )
    con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES ('r', NULL), ('y', NULL)) t(run_id, base_run_id)")
    rows = con.execute(named_query("most_confident_wrong")).fetchall()
    got = {row[1]: float(row[-1]) for row in rows}  # the literals above are DECIMALs
    assert got == pytest.approx({"a": 0.9, "b": 0.6, "c": 0.7, "d": 0.8})
    assert [row[1] for row in rows if row[0] == "r"] == ["a", "b"]
    # the viewer's index column means the same
    columns = ("answer", "p_yes", "p_no", "top1_prob")
    cases = {("yes", None, None, 0.9): 0.9, ("red", None, None, 0.6): 0.6, ("yes", 0.7, 0.3, 0.99): 0.7}
    cases[("no", 0.2, 0.8, 0.5)] = 0.8
    for values, expected in cases.items():
        assert _p_answer(dict(zip(columns, values, strict=True))) == expected
