"""`vrp view` in a real browser (Debian's chromium, headless, through Playwright) and on disk.

Three lakes: one ingested by a tiny model with a real mask intervention and a text-only condition
run beside it; one whose question, answer, model name and image id are script injections; and
one written before the images table existed. Screenshots go to each test's tmp dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lake_util import ingest, make_run, sample_ids

from vrp.cli import main
from vrp.ingest.datasets import generate_shapes_pope
from vrp.ingest.models.tiny import build_tiny
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import open_lake
from vrp.lake.images import image_row, store_images
from vrp.view import ViewError, page_path, write_view

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
XSS_QUESTION = '"><img src=x onerror="window.__pwned=1">Is there a <script>window.__pwned=2</script> cat?'
XSS_ANSWER = "</script><script>window.__pwned=3</script>"
XSS_MODEL = "<script>window.__pwned=4<!--"
XSS_IMAGE = "<img src=x onerror=window.__pwned=5>.png"
N = 6
LAYERS = 3


# ---------------------------------------------------------------- lakes
@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """A tiny-llava run, a mask intervention on it, and a 'none' condition run of the same samples."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rich")
    data = generate_shapes_pope(root / "shapes", images=2, seed=3)
    model = build_tiny("llava", root / "tiny", seed=0, num_layers=LAYERS)
    lake_dir = str(root / "lake")
    options = IngestOptions(model=str(model), data_dir=str(data), limit=N, batch_size=N, self_consistency=2)
    summary = run_ingest(options, lake_dir, echo=lambda _line: None)
    run_id = summary.run_id
    args = [
        "ingest",
        "intervene",
        "mask",
        "--base-run",
        run_id,
        "--ratio",
        "0.5",
        "--conditions",
        "full,high",
    ]
    result = CliRunner().invoke(main, [*args, "--lake", lake_dir])
    assert result.exit_code == 0, result.output

    # a condition run: runs.kind names the condition,
    # base_run_id the image run, same sample ids; its answers differ on the first two samples
    lake = open_lake(lake_dir)
    base = lake.arrow("samples").to_pylist()
    lens = lake.arrow("layers", columns=["sample_id", "layer", "lens_truth_margin"]).to_pylist()
    config, source, revision = lake.sql(
        f"select config, model_source, model_revision from runs where run_id = '{run_id}'"
    ).fetchall()[0]
    condition = make_run(
        "cond-none-1",
        base[0]["model"],
        hidden_size=json.loads(config)["hidden_size"],
        kind="none",
        base_run_id=run_id,
        family="llava",
        model_source=source,
        model_revision=revision,
    )
    writer = lake.writer(condition)
    writer.begin()
    flipped = sorted(r["sample_id"] for r in base)[:2]
    samples = []
    for r in base:
        answer = r["answer"]
        if r["sample_id"] in flipped:
            answer = "no" if answer == "yes" else "yes"
        samples.append(
            {"sample_id": r["sample_id"], "label": r["label"], "answer": answer, "answer_text": answer}
        )
    layers = [
        {"sample_id": r["sample_id"], "layer": r["layer"], "lens_truth_margin": r["lens_truth_margin"] - 1.5}
        for r in lens
    ]
    writer.commit({"layers": layers, "samples": samples})
    writer.finish()
    return {"lake": lake_dir, "run": run_id, "flipped": flipped, "root": root}


@pytest.fixture(scope="module")
def rich_view(rich):
    out = rich["root"] / "view"
    summary = write_view(open_lake(rich["lake"]), out)
    return out, summary


@pytest.fixture(scope="module")
def xss_view(tmp_path_factory):
    """A lake whose text fields are script injections (a shared lake can come from anyone)."""
    root = tmp_path_factory.mktemp("xss")
    lake_dir = str(root / "lake")
    run = make_run("run-xss", XSS_MODEL)
    lake = open_lake(lake_dir)
    rng = np.random.default_rng(0)
    picture = image_row(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8))
    store_images(lake_dir, [picture])
    writer = lake.writer(run)
    writer.begin()
    maps = [
        {"sample_id": "x1", "layer": layer, "grid_h": 2, "grid_w": 3, "map": np.full(6, 1 / 6, np.float32)}
        for layer in range(2)
    ]
    writer.commit(
        {
            "attention_maps": maps,
            "generations": [{"sample_id": "x1", "k": 0, "text": XSS_ANSWER, "answer": None}],
            "samples": [
                {
                    "sample_id": "x1",
                    "question": XSS_QUESTION,
                    "answer_text": XSS_ANSWER,
                    "answer": XSS_ANSWER,
                    "label": XSS_ANSWER,
                    "image_id": XSS_IMAGE,
                    "correct": False,
                    "p_yes": 0.9,
                    "grid_h": 2,
                    "grid_w": 3,
                    "image_hash": picture["image_hash"],
                }
            ],
        }
    )
    writer.finish()
    out = root / "view"
    write_view(open_lake(lake_dir), out)
    return out, run["run_id"]


@pytest.fixture(scope="module")
def old_view(tmp_path_factory):
    """A lake written without pictures (as every run before the images table)."""
    root = tmp_path_factory.mktemp("old")
    lake_dir = str(root / "lake")
    ingest(lake_dir, make_run(), sample_ids(3))
    out = root / "view"
    summary = write_view(open_lake(lake_dir), out)
    return out, summary


# ---------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS
        )
        yield context
        context.close()


class Page:
    """One browser tab that records console errors, page errors and every request."""

    def __init__(self, context) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path, ready: str) -> None:
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector(ready)

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def tab(browser):
    page = Page(browser)
    yield page
    page.close()


def _only_local(requests: list[str], folder: Path) -> None:
    prefix = folder.resolve().as_uri() + "/"
    outside = [url for url in requests if not url.startswith(prefix)]
    assert not outside, f"requests outside the view folder: {outside}"


def test_index_loads_without_errors_or_network(rich_view, tab, tmp_path) -> None:
    out, summary = rich_view
    tab.open(out / "index.html", "#samples tbody tr")
    assert tab.page.locator("#samples tbody tr").count() == N == summary.samples
    tab.page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    assert not tab.errors, tab.errors
    _only_local(tab.requests, out)


def test_a_filter_narrows_the_rows_and_presets_work(rich, rich_view, tab, tmp_path) -> None:
    out, _ = rich_view
    tab.open(out / "index.html", "#samples tbody tr")
    rows = tab.page.locator("#samples tbody tr")
    questions = tab.page.locator("#samples tbody tr a").all_inner_texts()
    word = questions[0].split()[3]  # "Is there a <word> ..."
    expected = sum(word.lower() in q.lower() for q in questions)
    tab.page.fill("#filter", word)
    assert rows.count() == expected < N
    tab.page.screenshot(path=str(tmp_path / "filtered.png"), full_page=True)
    tab.page.fill("#filter", "")
    tab.page.click('button[data-preset="changes"]')  # present because a condition run exists
    keys = set(tab.page.locator("#samples tbody tr").evaluate_all("rs => rs.map(r => r.dataset.key)"))
    assert keys == {Path(page_path(rich["run"], s)).stem for s in rich["flipped"]}
    tab.page.click('button[data-preset="confident-wrong"]')
    wrong = tab.page.locator("#samples tbody tr").count()
    lake = open_lake(rich["lake"])
    assert (
        wrong
        == lake.sql(
            f"select count(*) from samples where run_id = '{rich['run']}' and not correct"
        ).fetchall()[0][0]
    )
    assert not tab.errors, tab.errors


def test_sample_page_shows_image_maps_conditions_and_interventions(rich, rich_view, tab, tmp_path) -> None:
    out, _ = rich_view
    sample = rich["flipped"][0]
    tab.open(out / page_path(rich["run"], sample), "#heatmap")
    image = tab.page.locator("img.picture").first
    assert image.evaluate("i => i.complete && i.naturalWidth") == 32  # the tiny model's 32 px view
    heat = "document.getElementById('heatmap').toDataURL()"
    evidence = "document.getElementById('evidence').toDataURL()"
    before, evidence_before = tab.page.evaluate(heat), tab.page.evaluate(evidence)
    tab.page.screenshot(path=str(tmp_path / "sample-last-layer.png"), full_page=True)
    tab.page.locator("#layer").fill("0")
    after, evidence_after = tab.page.evaluate(heat), tab.page.evaluate(evidence)
    assert before != after, "moving the layer slider must repaint the heatmap"
    assert evidence_before != evidence_after
    assert tab.page.inner_text("#layer-label") == "layer 0"
    tab.page.screenshot(path=str(tmp_path / "sample-layer-0.png"), full_page=True)
    tab.page.check("#layer-mean")
    assert tab.page.evaluate(heat) not in (before, after)
    # conditions: the lens chart has one curve per condition plus the image's, and the table
    assert tab.page.locator("svg.chart polyline").count() == 2
    assert "none" in tab.page.inner_text("body")
    # interventions: the mask rows, and drawing one row's patches marks the image
    assert tab.page.locator("text=draw").count() >= 1
    blank = tab.page.evaluate("document.getElementById('marks').toDataURL()")
    tab.page.locator("button.show-cells").last.click()
    assert tab.page.evaluate("document.getElementById('marks').toDataURL()") != blank
    tab.page.screenshot(path=str(tmp_path / "sample-interventions.png"), full_page=True)
    assert not tab.errors, tab.errors
    _only_local(tab.requests, out)


def test_lake_text_is_shown_as_text_and_never_runs(xss_view, tab, tmp_path) -> None:
    out, run_id = xss_view
    tab.open(out / "index.html", "#samples tbody tr")
    tab.page.screenshot(path=str(tmp_path / "xss-index.png"), full_page=True)
    assert tab.page.locator("#samples tbody tr a").inner_text() == XSS_QUESTION.strip()
    assert XSS_MODEL in tab.page.inner_text("#samples")
    assert tab.page.evaluate("window.__pwned === undefined")
    tab.page.locator("#samples tbody tr a").click()
    tab.page.wait_for_selector("#question")
    tab.page.screenshot(path=str(tmp_path / "xss-sample.png"), full_page=True)
    assert tab.page.inner_text("#question") == XSS_QUESTION.strip()
    assert tab.page.inner_text("#answer") == XSS_ANSWER
    assert tab.page.inner_text("#model") == XSS_MODEL
    assert tab.page.inner_text("#image-id") == XSS_IMAGE
    assert tab.page.evaluate("window.__pwned === undefined"), "an injected script ran"
    assert tab.page.locator('img[src="x"]').count() == 0
    assert tab.page.locator("img.picture").first.evaluate("i => i.naturalWidth") == 24
    _only_local(tab.requests, out)


def test_a_lake_without_images_says_so(old_view, tab) -> None:
    out, summary = old_view
    assert summary.missing_images == summary.samples == 3
    tab.open(out / "index.html", "#samples tbody tr")
    assert "no picture in the lake" in tab.page.inner_text("#missing-images")
    tab.page.locator("#samples tbody tr a").first.click()
    tab.page.wait_for_selector(".noimage")
    assert "image not in the lake" in tab.page.inner_text(".noimage")
    assert not tab.errors, tab.errors


# ---------------------------------------------------------------- on disk
def test_view_files_hold_no_lake_text_outside_json(xss_view) -> None:
    out, _ = xss_view
    for page in [out / "index.html", *(out / "s").glob("*.html")]:
        text = page.read_text()
        assert "pwned" not in text and "onerror" not in text
    for data in (out / "data").rglob("*.js"):
        raw = data.read_bytes()
        assert raw.isascii() and b"<" not in raw and b">" not in raw


def test_where_is_read_only_and_values_are_bound(rich, tmp_path) -> None:
    runner = CliRunner()
    base = ["view", "--lake", rich["lake"], "--format", "json"]
    lake = open_lake(rich["lake"])
    p_yes = sorted(
        r[0] for r in lake.sql(f"select p_yes from samples where run_id = '{rich['run']}'").fetchall()
    )
    where = f"p_yes > {p_yes[N // 2 - 1]!r} AND label IS NOT NULL"
    ok = runner.invoke(main, [*base, "--where", where, "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["samples"] == N - N // 2
    quoted = runner.invoke(main, [*base, "--model", "x' OR '1'='1", "--out", str(tmp_path / "b")])
    assert quoted.exit_code != 0 and "no samples match" in quoted.output  # bound, not spliced
    for bad in ("1=1; DROP TABLE samples", "EXISTS (SELECT * FROM read_csv('/etc/passwd'))"):
        result = runner.invoke(main, [*base, "--where", bad, "--out", str(tmp_path / "c")])
        assert result.exit_code != 0, bad
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, (
            result.output
        )
    limited = runner.invoke(main, [*base, "--limit", "2", "--out", str(tmp_path / "d")])
    assert json.loads(limited.output)["samples"] == 2


def test_view_refuses_to_replace_a_folder_that_is_not_a_view(rich, tmp_path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ViewError, match="not a VRP view"):
        write_view(open_lake(rich["lake"]), precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    view = tmp_path / "view"
    write_view(open_lake(rich["lake"]), view, limit=1)
    write_view(open_lake(rich["lake"]), view, limit=2)  # a previous view is replaced
    assert len(list((view / "s").glob("*.html"))) == 2
    shutil.rmtree(view)
