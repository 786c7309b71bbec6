"""`vrp lake export --to` refuses destinations it would damage or that would not survive."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from lake_util import ingest, make_run, sample_ids

from vrp.lake import open_lake
from vrp.lake.commands import lake as lake_group


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lake"))
    ingest(root, make_run("run-a"), sample_ids(2))
    return root


def _export(root: str, dest: str):
    return CliRunner().invoke(lake_group, ["export", "--lake", root, "--to", dest])


def test_a_non_empty_folder_is_refused_and_its_readme_kept(lake_root, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "README.md").write_text("my own notes\n")
    result = _export(lake_root, str(dest))
    assert result.exit_code != 0 and "not empty" in result.output
    assert "Traceback" not in result.output and "\n" not in result.output.strip()
    assert os.listdir(dest) == ["README.md"] and (dest / "README.md").read_text() == "my own notes\n"


def test_an_existing_file_is_refused_with_one_line(lake_root, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep\n")
    result = _export(lake_root, str(target))
    assert result.exit_code != 0 and "existing file" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert target.read_text() == "keep\n"


@pytest.mark.parametrize("inside", ["exports/v1", "samples/copy", "."])
def test_a_destination_inside_the_lake_is_refused(lake_root, inside):
    before = sorted(os.walk(lake_root))
    result = _export(lake_root, os.path.join(lake_root, inside))
    assert result.exit_code != 0 and "inside the lake" in result.output, result.output
    assert sorted(os.walk(lake_root)) == before


def test_a_new_or_empty_folder_is_accepted(lake_root, tmp_path):
    (tmp_path / "empty").mkdir()
    for dest in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        result = _export(lake_root, str(dest))
        assert result.exit_code == 0, result.output
        assert open_lake(str(dest)).arrow("samples").num_rows == 2
