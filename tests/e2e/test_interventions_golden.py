"""The moved intervention kinds answer exactly as the single-module code did (bit for bit, three toys)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "golden"))

from interventions import GOLDEN, TOYS, encode, produce_rows  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return encode(produce_rows(tmp_path_factory.mktemp("golden")))


@pytest.mark.parametrize("toy", TOYS)
def test_mask_ablate_destroy_rows_equal_the_golden_record(rows, toy) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[toy]
    assert {r["kind"] for r in golden} == {"mask", "ablate", "destroy"}
    assert len(rows[toy]) == len(golden)
    for got, want in zip(rows[toy], golden, strict=True):
        assert got == want, (got["kind"], got["setting"], got["sample_id"], got["condition"])
