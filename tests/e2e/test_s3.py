"""The lake on S3: a local S3-compatible server (moto's server mode) on loopback, with real
credential checks (IAM auth on), started by these tests.

Covered: ingest into ``s3://`` (through ``VRP_LAKE``), query it, compare it with the same run
written locally, export it to a directory and to another prefix, check and vacuum it, concurrent
writers (conditional writes), and wrong credentials (a clear error and nothing written).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import duckdb
import lake_util
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from deltalake import DeltaTable, write_deltalake
from lake_util import ROWS_PER_SAMPLE, make_run, sample_ids
from test_scale import assert_same_rows

from vrp.analysis.synthetic import write_synthetic_lake
from vrp.cli import main
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.lake import open_lake, storage
from vrp.schema import TABLES

boto3 = pytest.importorskip("boto3", reason="the S3 tests need moto[server] (in the dev extra)")
pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (in the dev extra)")

SPAWN = multiprocessing.get_context("spawn")
BUCKET = "vrp-share"
N_QUESTIONS = 8
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with authentication on, one IAM user allowed everything, one bucket."""
    port = _free_port()
    # the first three requests (creating the user, its key and its policy) go unauthenticated
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.05)
        iam = boto3.client(
            "iam", endpoint_url=url, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="vrp")
        key = iam.create_access_key(UserName="vrp")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="vrp", PolicyName="all", PolicyDocument=json.dumps(policy))
        creds = {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_REGION": REGION,
        }
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(name, raising=False)
            for name, value in creds.items():
                mp.setenv(name, value)
            yield client
    finally:
        server.terminate()
        server.wait(10)


def _keys(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.fixture(scope="module")
def workspace(shapes_workspace, tiny_checkpoint):
    root, data = shapes_workspace("s3", images=4, seed=5)
    return root, data, tiny_checkpoint("llava", root / "tiny-llava", seed=1, num_layers=2)


def test_storage_options_come_from_the_aws_environment() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ENDPOINT_URL": "http://minio.local:9000",
    }
    assert storage.storage_options("s3://b/p", env) == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_REGION": "eu-west-3",
        "AWS_ENDPOINT_URL": "http://minio.local:9000",
        "AWS_ALLOW_HTTP": "true",
        "conditional_put": "etag",
    }
    https = storage.storage_options("s3://b", {**env, "AWS_ENDPOINT_URL": "https://s3.example"})
    assert "AWS_ALLOW_HTTP" not in https
    assert storage.storage_options("./vrp-lake", env) is None
    assert storage.normalize_root("s3://b/p/") == "s3://b/p"
    with pytest.raises(storage.LakeStorageError, match="only local directories and s3://"):
        storage.normalize_root("gs://b/p")


def test_ingest_query_and_export_a_lake_on_s3(s3, workspace, tmp_path, monkeypatch) -> None:
    root, data, model = workspace
    uri = f"s3://{BUCKET}/team/lake"
    monkeypatch.setenv("VRP_LAKE", uri)
    runner = CliRunner()
    args = ["ingest", "run", "--model", str(model), "--data-dir", str(data), "--limit", str(N_QUESTIONS)]
    args += ["--batch-size", "4", "--self-consistency", "2"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert f"{N_QUESTIONS} new samples" in first.output
    assert any(k.startswith("team/lake/samples/_delta_log/") for k in _keys(s3, "team/lake/"))
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "0 new samples" in again.output

    # the same run written to a local lake holds the same rows
    local = str(tmp_path / "local")
    options = IngestOptions(
        model=str(model), data_dir=str(data), limit=N_QUESTIONS, batch_size=4, self_consistency=2
    )
    run_ingest(options, local, echo=lambda _line: None)
    remote = open_lake(uri)
    assert_same_rows(open_lake(local), remote)

    sql = "select count(*) as n from samples join hidden using (run_id, sample_id)"
    result = runner.invoke(main, ["query", "--format", "csv", sql])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(N_QUESTIONS * 2 * 2)
    info = runner.invoke(main, ["lake", "info"])
    assert info.exit_code == 0 and "complete" in info.output and f"done={N_QUESTIONS}" in info.output
    checked = runner.invoke(main, ["lake", "check"])
    assert checked.exit_code == 0 and "0 damaged, 0 orphan(s)" in checked.output, checked.output

    # export to a directory: one table version each, the same rows, and a card
    versions = remote.versions()
    out_dir = tmp_path / "export"
    exported = runner.invoke(main, ["lake", "export", "--to", str(out_dir)])
    assert exported.exit_code == 0, exported.output
    copy = open_lake(str(out_dir))
    assert_same_rows(remote, copy)
    assert copy.sql("select * from runs").fetchall() == remote.sql("select * from runs").fetchall()
    for name, version in versions.items():
        assert f"{name:16s} version {version:5d}" in exported.output
        history = copy.delta(name).history()
        assert [h.get("vrp.source_version") for h in history if h.get("vrp.operation") == "export"] == [
            str(version)
        ]
    card = (out_dir / "README.md").read_text()
    run_id = remote.sql("select run_id from runs").fetchall()[0][0]
    assert run_id in card and "tiny-llava" in card and "| shapes-pope | random | 8 | 1 |" in card
    for field in TABLES["hidden"].schema:
        assert f"| {field.name} | {field.type} |" in card

    # export to another prefix of the bucket; a second export there is refused
    shared = f"s3://{BUCKET}/shared/v1"
    exported = runner.invoke(main, ["lake", "export", "--to", shared])
    assert exported.exit_code == 0, exported.output
    assert_same_rows(remote, open_lake(shared))
    assert "shared/v1/README.md" in _keys(s3, "shared/v1/")
    refused = runner.invoke(main, ["lake", "export", "--to", shared])
    assert refused.exit_code != 0 and "empty destination" in refused.output

    # a collaborator reads the shared copy without VRP, as the README shows
    opts = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    opts |= {"AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true"}
    con = duckdb.connect()
    con.register("samples", DeltaTable(f"{shared}/samples", storage_options=opts).to_pyarrow_dataset())
    assert con.sql("SELECT count(*) FROM samples").fetchall() == [(N_QUESTIONS,)]
    layers = pl.scan_delta(f"{shared}/layers", storage_options=opts).filter(pl.col("layer") == 0).collect()
    assert layers.height == N_QUESTIONS

    # maintenance on a remote lake: compaction keeps the rows, drop-run removes them
    compacted = runner.invoke(main, ["lake", "compact", "--lake", shared])
    assert compacted.exit_code == 0, compacted.output
    assert_same_rows(remote, open_lake(shared))
    dropped = runner.invoke(main, ["lake", "drop-run", "--lake", shared, "--yes", run_id])
    assert dropped.exit_code == 0, dropped.output
    assert open_lake(shared).sql("SELECT count(*) FROM hidden").fetchall() == [(0,)]


def test_report_renders_from_a_lake_on_s3(s3, tmp_path) -> None:
    uri = f"s3://{BUCKET}/synthetic"
    write_synthetic_lake(uri, models=("toy-llava",), n=60, layers=3, hidden_size=8, interventions=False)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--lake", uri, "--out", str(out), "--n-boot", "100"])
    assert result.exit_code == 0, result.output
    md = ((out / "latest").resolve() / "report.md").read_text()
    assert "### Headline: which signals predict a correct answer" in md
    assert "toy-llava R_pb [95% CI]" in md and uri in md
    assert _keys(s3, "synthetic/") and not any("report" in k for k in _keys(s3, "synthetic/"))


def test_wrong_credentials_give_a_clear_error_and_write_nothing(s3, workspace, monkeypatch) -> None:
    root, data, model = workspace
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    uri = f"s3://{BUCKET}/denied"
    args = ["ingest", "run", "--model", str(model), "--data-dir", str(data), "--limit", "4", "--lake", uri]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "access denied" in result.output and "AWS_SECRET_ACCESS_KEY" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["query", "--lake", uri, "select 1"])
    assert result.exit_code == 1 and "access denied" in result.output
    monkeypatch.undo()
    assert _keys(s3, "denied") == []
    result = CliRunner().invoke(main, ["query", "--lake", "s3://no-such-bucket/lake", "select 1"])
    assert result.exit_code == 1 and "the bucket does not exist" in result.output


def test_lake_check_and_vacuum_on_s3(s3) -> None:
    """A damaged committed object and a stray one, found by check; vacuum removes only the stray."""
    uri = f"s3://{BUCKET}/upkeep"
    lake_util.ingest(uri, make_run(), sample_ids(2))
    victim_uri = open_lake(uri).delta("samples").file_uris()[0]
    victim = victim_uri.removeprefix(f"s3://{BUCKET}/")
    body = s3.get_object(Bucket=BUCKET, Key=victim)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=victim, Body=body[: len(body) // 2])
    stray = "upkeep/hidden/model=m/part-killed-writer.parquet"
    s3.put_object(Bucket=BUCKET, Key=stray, Body=b"half a file")
    runner = CliRunner()
    checked = runner.invoke(main, ["lake", "check", "--lake", uri])
    assert checked.exit_code == 1
    damaged = [line for line in checked.output.splitlines() if line.startswith("DAMAGED")]
    orphans = [line for line in checked.output.splitlines() if line.startswith("ORPHAN")]
    assert len(damaged) == 1 and victim_uri in damaged[0] and "the log says" in damaged[0]
    assert len(orphans) == 1 and f"s3://{BUCKET}/{stray}" in orphans[0]
    before = set(_keys(s3, "upkeep/"))
    guarded = runner.invoke(main, ["lake", "vacuum", "--lake", uri, "--yes"])  # a writer may own it
    assert guarded.exit_code == 0 and "removed 0 orphan" in guarded.output
    dry = runner.invoke(main, ["lake", "vacuum", "--lake", uri, "--min-age-minutes", "0"])
    assert dry.exit_code == 0 and "would remove 1 orphan" in dry.output
    assert set(_keys(s3, "upkeep/")) == before
    removed = runner.invoke(main, ["lake", "vacuum", "--lake", uri, "--min-age-minutes", "0", "--yes"])
    assert removed.exit_code == 0 and "removed 1 orphan" in removed.output, removed.output
    # pyarrow leaves an empty "folder/" marker when it deletes a folder's last object; not a file
    assert {k for k in _keys(s3, "upkeep/") if not k.endswith("/")} == before - {stray}
    assert runner.invoke(main, ["lake", "check", "--lake", uri]).output.count("ORPHAN") == 0


def test_a_stale_writer_does_not_overwrite_a_concurrent_commit(s3) -> None:
    """Conditional writes: a commit prepared from an old snapshot must land after the commit that
    raced it, not replace it (with a plain PUT, version 1 would be overwritten and "a" lost)."""
    uri = f"s3://{BUCKET}/race/t"
    options = storage.storage_options(uri)
    write_deltalake(uri, pa.table({"who": ["init"]}), storage_options=options)
    stale = DeltaTable(uri, storage_options=options)  # at version 0, held open
    fresh = DeltaTable(uri, storage_options=options)
    write_deltalake(fresh, pa.table({"who": ["a"]}), mode="append")  # version 1
    write_deltalake(stale, pa.table({"who": ["b"]}), mode="append")  # tries version 1 first
    dt = DeltaTable(uri, storage_options=options)
    assert dt.version() == 2
    assert sorted(dt.to_pyarrow_dataset().to_table().column("who").to_pylist()) == ["a", "b", "init"]
    logs = [k.rsplit("/", 1)[-1] for k in _keys(s3, "race/t/_delta_log/") if k.endswith(".json")]
    assert logs == [f"{v:020d}.json" for v in range(3)]


def test_two_spawned_writers_on_s3_lose_no_rows(s3) -> None:
    root = f"s3://{BUCKET}/concurrent"
    procs = [
        SPAWN.Process(
            target=lake_util.child_ingest,
            kwargs={"root": root, "run": make_run(name), "ids": sample_ids(4, name[-1]), "batch_size": 2},
        )
        for name in ("run-a", "run-b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    lake = open_lake(root)
    for name, per in ROWS_PER_SAMPLE.items():
        got = dict(lake.sql(f"SELECT run_id, count(*) FROM {name} GROUP BY run_id").fetchall())
        assert got == {"run-a": 4 * per, "run-b": 4 * per}, name


def test_export_refuses_a_non_empty_prefix_and_one_inside_the_lake(s3, tmp_path) -> None:
    uri = f"s3://{BUCKET}/refusals"
    lake_util.ingest(uri, make_run(), sample_ids(2))
    s3.put_object(Bucket=BUCKET, Key="theirs/README.md", Body=b"their notes")
    runner = CliRunner()
    refused = runner.invoke(main, ["lake", "export", "--lake", uri, "--to", f"s3://{BUCKET}/theirs"])
    assert refused.exit_code != 0 and "not empty" in refused.output, refused.output
    assert _keys(s3, "theirs/") == ["theirs/README.md"]
    assert s3.get_object(Bucket=BUCKET, Key="theirs/README.md")["Body"].read() == b"their notes"
    before = _keys(s3, "refusals/")
    inside = runner.invoke(main, ["lake", "export", "--lake", uri, "--to", f"{uri}/exports/v1"])
    assert inside.exit_code != 0 and "inside the lake" in inside.output
    assert _keys(s3, "refusals/") == before
    elsewhere = runner.invoke(main, ["lake", "export", "--lake", uri, "--to", f"s3://{BUCKET}/refusals-v1"])
    assert elsewhere.exit_code == 0, elsewhere.output  # a sibling prefix sharing the name's start is fine
