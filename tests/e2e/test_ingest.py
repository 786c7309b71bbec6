"""`vrp ingest run` end to end on tiny models: row counts, idempotent reruns, joins, bad activations."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import vrp.ingest.models as models
from vrp.cli import main
from vrp.ingest.run import IngestError, IngestOptions, run_ingest
from vrp.lake import open_lake

N_QUESTIONS = 20
K = 2


@pytest.fixture(scope="module")
def workspace(shapes_workspace, tiny_checkpoint):
    root, data = shapes_workspace("ingest", images=6, seed=11)
    llava = tiny_checkpoint("llava", root / "tiny-llava", seed=0, num_layers=2)
    qwen = tiny_checkpoint("qwen2vl", root / "tiny-qwen", seed=0, num_layers=3)
    return root, data, llava, qwen


def _options(model, data, **overrides) -> IngestOptions:
    base = {
        "model": str(model),
        "dataset": "shapes-pope",
        "data_dir": str(data),
        "limit": N_QUESTIONS,
        "batch_size": 4,
        "self_consistency": K,
        "commit_samples": 8,
    }
    return IngestOptions(**{**base, **overrides})


def test_ingest_writes_expected_rows_and_rerun_adds_nothing(workspace) -> None:
    root, data, llava, qwen = workspace
    lake_dir = str(root / "lake")
    runner = CliRunner()
    args = ["ingest", "run", "--model", str(llava), "--data-dir", str(data), "--limit", str(N_QUESTIONS)]
    args += ["--batch-size", "4", "--self-consistency", str(K), "--lake", lake_dir]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert f"{N_QUESTIONS} new samples" in first.output
    summary = run_ingest(_options(qwen, data), lake_dir, echo=lambda _line: None)
    assert summary.written == N_QUESTIONS

    lake = open_lake(lake_dir)
    expected = {"llava": 2, "qwen2vl": 3}  # decoder layers of each tiny model
    runs = dict(lake.sql("select family, run_id from runs").fetchall())
    assert set(runs) == set(expected)
    for family, n_layers in expected.items():
        run = runs[family]
        counts = {
            table: lake.sql(f"select count(*) from {table} where run_id = '{run}'").fetchall()[0][0]
            for table in ("samples", "layers", "attention_maps", "hidden", "generations")
        }
        assert counts == {
            "samples": N_QUESTIONS,
            "layers": N_QUESTIONS * n_layers,
            "attention_maps": N_QUESTIONS * n_layers,
            "hidden": N_QUESTIONS * n_layers * 2,
            "generations": N_QUESTIONS * K,
        }
        heads = lake.sql(f"select count(distinct head) from heads where run_id = '{run}'").fetchall()[0][0]
        assert lake.sql(f"select count(*) from heads where run_id = '{run}'").fetchall()[0][0] == (
            N_QUESTIONS * n_layers * heads
        )

    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "0 new samples" in again.output
    assert lake.sql("select count(*) from samples").fetchall()[0][0] == 2 * N_QUESTIONS

    # one row per (sample, layer) in a join, also with two models sharing sample ids
    joined = lake.sql(
        "select s.model, s.sample_id, l.layer, count(*) as n from samples s "
        "join layers l on s.run_id = l.run_id and s.sample_id = l.sample_id group by all"
    ).fetchall()
    assert len(joined) == N_QUESTIONS * 5 and {row[3] for row in joined} == {1}
    shared = lake.sql("select count(distinct sample_id) from samples").fetchall()[0][0]
    assert shared == N_QUESTIONS, "sample ids must be the same for every model"
    out = runner.invoke(
        main,
        [
            "query",
            "--lake",
            lake_dir,
            "--format",
            "csv",
            "select count(*) as n from samples join layers using (run_id, sample_id)",
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1] == str(N_QUESTIONS * 5)


def test_sc_agreement_matches_generations(workspace) -> None:
    root, data, llava, _ = workspace
    lake_dir = str(root / "lake-sc")
    run_ingest(_options(llava, data, limit=8, self_consistency=4), lake_dir, echo=lambda _line: None)
    lake = open_lake(lake_dir)
    samples = lake.table("samples").collect().to_dicts()
    generations = lake.table("generations").collect()
    for row in samples:
        answers = (
            generations.filter(generations["sample_id"] == row["sample_id"]).sort("k")["answer"].to_list()
        )
        keys = ["unknown" if a is None else a for a in answers]
        top = max(keys.count(key) for key in keys)
        assert row["sc_agreement"] == pytest.approx(top / 4)


def _poisoning_loader(monkeypatch) -> None:
    """Load adapters whose decoder layer 1 writes NaN into the first row of every prefill batch."""
    real = models.load_adapter

    def load(*args, **kwargs):
        adapter = real(*args, **kwargs)

        def poison(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] > 1:
                hidden[0] = float("nan")

        adapter.decoder_layers()[1].register_forward_hook(poison)
        return adapter

    monkeypatch.setattr(models, "load_adapter", load)


def test_nan_activations_go_to_failures_and_the_run_goes_on(workspace, monkeypatch) -> None:
    root, data, llava, _ = workspace
    _poisoning_loader(monkeypatch)
    lake_dir = str(root / "lake-nan")
    summary = run_ingest(
        _options(llava, data, limit=12, self_consistency=0), lake_dir, echo=lambda _line: None
    )
    assert summary.written == 9 and len(summary.failures) == 3  # one poisoned row per batch of 4
    lake = open_lake(lake_dir)
    failures = lake.sql("select stage, error from failures").fetchall()
    assert len(failures) == 3
    assert all(stage == "capture" and "non-finite" in error and "layer" in error for stage, error in failures)
    assert lake.sql("select count(*) from samples").fetchall()[0][0] == 9
    assert lake.sql("select count(*) from hidden").fetchall()[0][0] == 9 * 2 * 2


def test_strict_stops_on_nan(workspace, monkeypatch) -> None:
    root, data, llava, _ = workspace
    _poisoning_loader(monkeypatch)
    with pytest.raises(IngestError, match="--strict"):
        run_ingest(
            _options(llava, data, limit=4, self_consistency=0, strict=True),
            str(root / "lake-strict"),
            echo=lambda _line: None,
        )


def test_size_guard_refuses_before_writing(workspace) -> None:
    root, data, llava, _ = workspace
    lake_dir = root / "lake-big"
    with pytest.raises(IngestError, match="--max-bytes"):
        run_ingest(_options(llava, data, max_bytes=1000), str(lake_dir), echo=lambda _line: None)
    assert not open_lake(str(lake_dir)).has_table("samples")


def test_layer_out_of_range_is_a_clear_error(workspace) -> None:
    root, data, llava, _ = workspace
    with pytest.raises(IngestError, match="out of range"):
        run_ingest(_options(llava, data, layers=(5,)), str(root / "lake-layers"), echo=lambda _line: None)
