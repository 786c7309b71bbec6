"""`vrp report` and `vrp analyze` on small lakes written with the lake writer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from vrp.analysis import compute, report
from vrp.analysis.synthetic import write_synthetic_lake
from vrp.cli import main
from vrp.lake import open_lake

N_BOOT = "200"


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    write_synthetic_lake(
        root, n=60, layers=3, hidden_size=8, constant_cluster_count=("toy-qwen",), destroy=True
    )
    return root


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_report_renders_links_its_figures_and_rerenders_identically(lake_dir, tmp_path) -> None:
    before = _files(lake_dir)
    out = tmp_path / "rep"
    code, text = _run("report", "--lake", str(lake_dir), "--out", str(out), "--n-boot", N_BOOT)
    assert code == 0, text
    first = (out / "latest").resolve()
    md = (first / "report.md").read_text()
    page = (first / "report.html").read_text()
    assert "### Headline: which signals predict a correct answer" in md
    for row in ("C_k (cluster count)", "H_s (spatial entropy)", "self-consistency", "best probe (held-out)"):
        assert f"| {row} |" in md
    assert "toy-llava R_pb [95% CI]" in md and "pooled AUROC [95% CI]" in md
    assert "| toy-qwen | mask | high |" in md  # intervention table with McNemar p
    links = re.findall(r"\]\((figures/[^)]+)\)", md)
    assert len(links) == 4 and "figures/destruction_curve.png" in links
    for link in links:
        assert (first / link).stat().st_size > 1000
    assert "| toy-llava | destroy | probe | 0.50 |" in md
    assert page.count('src="data:image/png;base64,') == 4 and 'src="figures' not in page
    # second render with --force: byte-identical apart from the one timestamp line
    code, text = _run("report", "--lake", str(lake_dir), "--out", str(out), "--n-boot", N_BOOT, "--force")
    assert code == 0, text
    second = (out / "latest").resolve()
    assert second != first
    for name in ("report.md", "report.html", *links):
        a, b = (first / name).read_bytes(), (second / name).read_bytes()
        if name.startswith("figures"):
            assert a == b, name
        else:
            diff = [(x, y) for x, y in zip(a.splitlines(), b.splitlines(), strict=True) if x != y]
            assert all(report.TIMESTAMP_PREFIX.encode() in x for x, _ in diff) and len(diff) <= 1
    assert _files(lake_dir) == before  # the report never writes to the lake


def test_unchanged_lake_is_skipped(lake_dir, tmp_path) -> None:
    out = tmp_path / "rep"
    assert _run("report", "--lake", str(lake_dir), "--out", str(out), "--n-boot", "50")[0] == 0
    code, text = _run("report", "--lake", str(lake_dir), "--out", str(out), "--n-boot", "50")
    assert code == 0 and "no new runs since the last report" in text
    assert len([p for p in out.iterdir() if not p.name.startswith((".", "latest"))]) == 1
    assert (out / "latest" / "versions.json").is_file()


def test_new_commit_gives_a_new_dated_report(tmp_path) -> None:
    truth = write_synthetic_lake(
        tmp_path / "lake", models=("m",), n=24, layers=2, hidden_size=4, interventions=False
    )
    out = tmp_path / "rep"
    args = ("report", "--lake", str(tmp_path / "lake"), "--out", str(out), "--n-boot", "50")
    assert _run(*args)[0] == 0
    first = (out / "latest").resolve()
    open_lake(tmp_path / "lake").write_table(
        "probe_layers",
        [
            {
                "run_id": truth["m"].run_id,
                "model": "m",
                "site": "resid",
                "layer": 1,
                "probe": "logreg",
                "auroc": 0.5,
                "auroc_low": 0.4,
                "auroc_high": 0.6,
                "n": 24,
                "folds": 4,
            }
        ],
    )
    code, text = _run(*args)
    assert code == 0 and "report written" in text
    second = (out / "latest").resolve()
    assert second != first and first.is_dir()
    assert (second / "versions.json").read_text() != (first / "versions.json").read_text()
    assert '"probe_layers"' in (second / "versions.json").read_text()


def test_report_fails_clearly(tmp_path) -> None:
    code, text = _run("report", "--lake", str(tmp_path / "none"), "--out", str(tmp_path / "rep"))
    assert code != 0 and "no lake at" in text
    os.makedirs(tmp_path / "empty")
    code, text = _run("report", "--lake", str(tmp_path / "empty"), "--out", str(tmp_path / "rep"))
    assert code != 0 and "no capture runs" in text
    assert not (tmp_path / "rep" / "latest").exists()


def test_report_renders_when_no_answer_parses(tmp_path) -> None:
    """A random-init model answers gibberish: the report still renders, saying why tables are empty."""
    write_synthetic_lake(tmp_path / "lake", models=("m",), n=12, layers=2, hidden_size=4, unknown_share=1.0)
    code, text = _run(
        "report", "--lake", str(tmp_path / "lake"), "--out", str(tmp_path / "rep"), "--n-boot", "20"
    )
    assert code == 0, text
    md = (tmp_path / "rep" / "latest" / "report.md").read_text()
    assert "No scored answers yet" in md and "| m | shapes-pope | random | 6 | 6 | 0.000 |" in md
    assert "figures/spatial_entropy_by_layer.png" in md  # attention needs no parsed answer


def test_headline_numbers_and_constant_metric(lake_dir) -> None:
    lake = open_lake(lake_dir)
    h = compute.headline(lake, n_boot=100, with_probe=False)
    cells = {(c.metric, c.group): c for c in h.rows}
    ci = [r for r in compute.data.query(lake, "correlation_inputs").to_pylist() if r["model"] == "toy-llava"]
    y = np.array([r["y"] for r in ci])
    ent = np.array([r["token_entropy"] for r in ci])
    c = cells[("token entropy", "toy-llava")]
    assert c.r == pytest.approx(sps.pointbiserialr(y, ent).statistic)
    assert c.auroc == pytest.approx(roc_auc_score(y, -ent))  # entropy: lower = more reliable
    ck = cells[("C_k (cluster count)", "toy-qwen")]
    assert ck.status == "constant" and ck.r is None and ck.q is None
    assert cells[("C_k (cluster count)", "toy-llava")].q is not None
    md = report.headline_table(h).markdown()
    assert "constant (0)" in md and "nan" not in md.lower()


def test_analyze_probes_stores_results_the_report_then_reads(tmp_path) -> None:
    truth = write_synthetic_lake(tmp_path, models=("m",), n=72, layers=5, hidden_size=8, interventions=False)
    code, text = _run("analyze", "probes", "--lake", str(tmp_path), "--n-boot", "100", "--neuron-layer", "-1")
    assert code == 0, text
    lake = open_lake(tmp_path)
    pl = lake.arrow("probe_layers").to_pylist()
    assert sorted((r["probe"], r["layer"]) for r in pl) == sorted(
        [("logreg", k) for k in range(5)] + [("last5", 4), ("mlp", 2)]
    )
    assert max((r for r in pl if r["probe"] == "logreg"), key=lambda r: r["auroc"])["layer"] == 2
    neurons = lake.arrow("probe_neurons").to_pylist()
    assert {(r["method"], r["layer"]) for r in neurons} == {("l1", 4), ("l2", 4)}
    assert sorted(r["rank"] for r in neurons if r["method"] == "l2") == list(range(1, 9))
    # a second run replaces, not appends
    assert _run("analyze", "probes", "--lake", str(tmp_path), "--n-boot", "100", "--no-neurons")[0] == 0
    assert open_lake(tmp_path).arrow("probe_layers").num_rows == len(pl)
    # the report uses the stored probes and recomputes the same held-out scores for the best layer
    got = compute.best_probe_scores(open_lake(tmp_path), truth["m"].run_id, n_boot=100)
    assert got is not None and got[0].source == "lake"
    ids = [s for s, c in zip(truth["m"].sample_ids, truth["m"].correct, strict=True) if c is not None]
    y = [bool(c) for c in truth["m"].correct if c is not None]
    best = next(r for r in pl if r["probe"] == "logreg" and r["layer"] == 2)
    assert roc_auc_score(y, [got[1][s] for s in ids]) == pytest.approx(best["auroc"])


def test_analyze_correlations_and_margins_print_tables(lake_dir) -> None:
    code, text = _run("analyze", "correlations", "--lake", str(lake_dir), "--n-boot", "100", "--no-probe")
    assert code == 0 and "token entropy" in text and "pooled" in text and "constant" in text
    code, text = _run("analyze", "margins", "--lake", str(lake_dir), "--model", "toy-llava")
    assert code == 0 and "lock-in" in text and "toy-qwen" not in text


def test_analysis_never_imports_torch() -> None:
    code = (
        "import sys, vrp.analysis.commands, vrp.analysis.report, vrp.analysis.probes; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_report_says_each_part_as_it_is_done(lake_dir, tmp_path) -> None:
    """The demo's progress bar for the report counts these calls against ``REPORT_PARTS``."""
    from vrp.analysis.report import REPORT_PARTS, write_report

    parts: list[str] = []
    outcome = write_report(str(lake_dir), tmp_path / "rep", n_boot=int(N_BOOT), step=parts.append)
    assert outcome.path.joinpath("report.html").is_file()
    assert parts == list(REPORT_PARTS)
