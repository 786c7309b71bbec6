"""Golden record of the shipped toys' lakes: a digest of every column a yes/no run writes.

Why: moving the yes/no behaviour behind the task seam must not move a single number of the
demo. ``python tests/golden/toy_lakes.py`` (run with the code being compared against) writes
``toy_lakes.json``; ``tests/test_golden_toys.py`` ingests the same questions with the current
code and compares column by column. Floats are hashed through ``repr`` (exact round trip), so
the comparison is bit-equality, not a tolerance.

Only the columns recorded in the JSON are compared: columns added later are free to appear.
Run ids are left out because they hash the schema version and the code's run identity.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).with_name("toy_lakes.json")
TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")
TABLES = ("samples", "layers", "generations", "interventions")
SKIP = {"run_id", "base_run_id"}
QUESTIONS = 4
K = 2


def _digest(values: list[Any]) -> str:
    return hashlib.sha256(json.dumps(values, default=repr).encode()).hexdigest()[:16]


def toy_lake_digests(workdir: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Ingest a few shapes-POPE questions with each toy (plus one mask run) and digest each column."""
    import torch

    from vrp.ingest.datasets.shapes import generate_shapes_pope
    from vrp.ingest.run import IngestOptions, run_ingest
    from vrp.interventions import plan_mask, run_intervention
    from vrp.lake import open_lake
    from vrp.schema import TABLES as SPECS

    torch.set_num_threads(1)
    toys = Path(__file__).resolve().parents[2] / "vrp" / "toys"
    data = generate_shapes_pope(workdir / "shapes", images=2, seed=5)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for toy in TOYS:
        lake_dir = str(workdir / f"lake-{toy}")
        options = IngestOptions(
            model=str(toys / toy), data_dir=str(data), limit=QUESTIONS, batch_size=2, self_consistency=K
        )
        run_id = run_ingest(options, lake_dir, echo=lambda _line: None).run_id
        lake = open_lake(lake_dir)
        plan = plan_mask(lake, run_id, ratio=0.5, conditions=("full", "high"))
        run_intervention(plan, lake_dir, echo=lambda _line: None)
        lake = open_lake(lake_dir)
        out[toy] = {}
        for table in TABLES:
            data_table = lake.arrow(table).sort_by([(c, "ascending") for c in SPECS[table].key])
            assert data_table.num_rows, (toy, table)
            out[toy][table] = {
                name: _digest(data_table.column(name).to_pylist())
                for name in data_table.column_names
                if name not in SKIP
            }
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        digests = toy_lake_digests(Path(tmp))
    GOLDEN.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
