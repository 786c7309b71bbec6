"""The yes/no task leaves every column of the toys' lakes bit-equal to the recorded golden digests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "golden"))

from toy_lakes import GOLDEN, toy_lake_digests  # noqa: E402


def test_toy_lakes_are_bit_equal_to_the_golden_record(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    fresh = toy_lake_digests(tmp_path)
    assert set(fresh) == set(golden)
    for toy, tables in golden.items():
        for table, columns in tables.items():
            for column, digest in columns.items():
                assert column in fresh[toy][table], f"{toy} {table}.{column} is no longer written"
                assert fresh[toy][table][column] == digest, f"{toy} {table}.{column} changed"
